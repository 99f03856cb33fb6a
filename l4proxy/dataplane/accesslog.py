"""Access log lines, as Istio's sidecar writes them (``--access-log``).

What a line says
================
One line per HTTP request a per-request relay ended (answered upstream,
answered locally, or cut short), and one per connection routed at L4 when
it ends (:func:`connection_record`: Envoy's tcp_proxy's, ``"- - -"`` and
response code 0, the worker's; see l4proxy/sidecar/worker.py), in Istio's
default TEXT format (Envoy's command operators, in Istio's order, ``-``
for what is unset or unknown)::

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
    %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%
    %CONNECTION_TERMINATION_DETAILS% "%UPSTREAM_TRANSPORT_FAILURE_REASON%"
    %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
    "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%"
    "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW%
    %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
    %REQUESTED_SERVER_NAME% %ROUTE_NAME%

or, with ``--access-log-format json``, one JSON object per line under
Istio's JSON encoding's keys (:data:`JSON_KEYS`, in the text format's
order), numbers where Envoy's JSON formatter gives numbers (the status,
the byte counts, the duration) and ``null`` where the text has ``-``
(``response_flags`` is the string ``"-"`` there too, as Envoy's).

The values, and where they differ from Envoy's:

* START_TIME: when the request's head was complete (UTC, milliseconds);
  DURATION: from then to the request's end, in whole milliseconds.
* PATH: the request target as the client sent it (before a route's
  rewrite: X-ENVOY-ORIGINAL-PATH's meaning); PROTOCOL: ``HTTP/1.1`` or
  ``HTTP/1.0``.
* RESPONSE_CODE: the final status the client got, 0 when none went out.
* BYTES_RECEIVED: the request body's bytes as they came (a chunked body's
  framing included); BYTES_SENT: every byte queued for the client for this
  request, response heads included (Envoy counts the body alone: telling
  the head's bytes apart would cost the compiled relay a store per
  request with the log off).
* X-ENVOY-UPSTREAM-SERVICE-TIME: always ``-`` (l4proxy adds no such
  header); CONNECTION_TERMINATION_DETAILS, UPSTREAM_TRANSPORT_FAILURE_REASON,
  REQUESTED_SERVER_NAME: ``-`` (no TLS here).
* A header sent on several lines: its values joined by ``,`` (Envoy's
  HTTP/1 codec's).
* UPSTREAM_HOST: the endpoint of the request's last try that reached one
  (a pooled connection taken or a connect begun), the connect's that
  failed for UF; UPSTREAM_LOCAL_ADDRESS: this side of the upstream
  connection that answered (``-`` for a failure or a local answer).
* UPSTREAM_CLUSTER: Istio's ``outbound|PORT|SUBSET|HOST`` (the subset: the
  version a canary line is about; empty where no subset was named),
  ``PassthroughCluster``, or ``-`` for a local answer (no route, a
  redirect, a direct response); ROUTE_NAME: the route's name (``default``
  where no rule matched), ``-`` where none.
* DOWNSTREAM_LOCAL_ADDRESS: where the client was going (its original
  destination; a gateway listener's own address); DOWNSTREAM_REMOTE_ADDRESS:
  the client's address.

RESPONSE_FLAGS (:data:`FLAG_NAMES`, comma-joined in Envoy's order when
several): UH no healthy upstream (no endpoint: a subset with no pod, every
pod ejected), UT the route's (or the last per-try) timeout, UF every
connect failed (or a retry's new connect), UC the upstream closed or reset
before the response's end, UO a circuit breaker's overflow (a first try's
or a retry's: never retried, as Envoy's router never retries one), NR no
route, DI a fault's delay, FI a fault's abort, DC the request's connection
ended before the response's end (the client went away, or the drain's
deadline cut it: RESPONSE_CODE_DETAILS ``downstream_remote_disconnect`` or
``downstream_local_disconnect(filter_chain_is_being_removed)``,
:data:`DRAIN_CUT`; a connection routed at L4 that the drain's deadline cut
says the same, its only RESPONSE_CODE_DETAILS), URX the retry policy's tries used up on an
outcome it retries, SI the idle timeout mid-request, DPE a request the
client framed wrong (a malformed head, a bad chunk), UPE a response the
upstream framed wrong, OM the proxy out of file descriptors for a try's
connection, a first try's or a retry's (its own overload, Envoy's overload
manager's flag; Envoy's router, given a socket() that fails, would say UF,
a local connection failure: here one cause keeps one flag, and UF stays
the endpoint's). RESPONSE_CODE_DETAILS follows (:func:`details`):
``via_upstream`` for an upstream's answer, else why the proxy answered.

Escaping: no value from the client or the rules can forge a line or a
field. A value is read as UTF-8: a valid character from U+00A0 up is
written as it is, in both formats (Envoy writes UTF-8 as it is: a route
named in Chinese reads as its name), its bytes never cut apart. TEXT:
``"`` and ``\\`` are escaped with ``\\``, every other byte outside
printable ASCII (controls, DEL, a byte that is no part of a valid UTF-8
character) as ``\\xHH``, a C1 control (U+0080 to U+009F) as its two
bytes' ``\\xC2\\xHH``. JSON: ``"``, ``\\`` and controls escaped as JSON
escapes them, DEL as ``\\u007f``, a C1 control as its ``\\u00hh``, a byte
that is no part of a valid UTF-8 character as ``\\u00hh`` (that byte read
as ISO-8859-1, HTTP's historic charset: any input gives valid JSON). A
value longer than its cap (:data:`CAPS`, in escaped bytes) is cut at a
whole escape or character and ends with ``...[truncated]``; X-Forwarded-For
keeps its end instead (the proxies in front append to it: its beginning is
the client's word), after ``...[truncated]``, from the start of an element
where one fits (its last 16 lines, where the others' first 16 are read). A
line is at most :data:`LINE_MAX` bytes (PIPE_BUF), so that it is one
``write()`` and several workers' lines on one pipe never interleave or
tear.

This module is the pure core (the line from a :class:`Record`) and the
pure twin's writer (:class:`LineWriter`); the compiled relay
(``ext/relay.pyx``) formats the same bytes in C, without the GIL, into a
bounded buffer of its own, drained by a writer thread of its own.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

log = logging.getLogger("l4proxy.accesslog")

__all__ = [
    "CAPS",
    "DEFAULT_BUFFER",
    "DRAIN_CUT",
    "FLAG_NAMES",
    "JSON_KEYS",
    "LINE_MAX",
    "NO_TAG",
    "AccessLog",
    "LineWriter",
    "Record",
    "TagLog",
    "address_text",
    "chunks",
    "connection_addresses",
    "connection_record",
    "details",
    "escape",
    "flags_text",
    "format_line",
    "origin_address",
    "shown_flags",
    "time_text",
    "utf8_length",
]

LINE_MAX = 4096  # PIPE_BUF on Linux: a write() of at most this to a pipe is atomic
DEFAULT_BUFFER = 1 << 20  # lines buffered before new ones are dropped (per relay)
TRUNCATED = b"...[truncated]"

# Envoy's response flags that l4proxy sets, as bits in Envoy's order (its
# ResponseFlagUtils list: a line joins them in this order)
UH = 1 << 0
UT = 1 << 1
UF = 1 << 2
UC = 1 << 3
UO = 1 << 4
NR = 1 << 5
DI = 1 << 6
FI = 1 << 7
DC = 1 << 8
URX = 1 << 9
SI = 1 << 10
DPE = 1 << 11
UPE = 1 << 12
NC = 1 << 13  # (a local answer's tag's: an Ingress path whose service is not loaded)
OM = 1 << 14
FLAG_NAMES = (
    *("UH", "UT", "UF", "UC", "UO", "NR", "DI", "FI", "DC", "URX", "SI", "DPE", "UPE", "NC"),
    "OM",
)
FLAGS = (1 << len(FLAG_NAMES)) - 1
# What else the relays tell the line (not flags; never written as such):
LOCAL_VERDICT = 1 << 16  # the route's own answer (its tag's flags, details; no cluster)
CUT = 1 << 17  # the request ended unanswered or cut: DC unless another flag says why
PATH_REFUSED = 1 << 18  # a rewrite made a dot-segment: 400 path_normalization_failed
# a connection routed at L4: no RESPONSE_CODE_DETAILS but a cut's (connection_record())
L4 = 1 << 19
# with CUT (a request's) or DC (a connection routed at L4): the proxy cut it
# itself, at the drain's deadline (DRAIN_CUT)
LOCAL_CUT = 1 << 20
TE_REFUSED = 1 << 21  # with DPE: a Transfer-Encoding other than chunked, 501 (INVALID_TE)
# with UT: the route's timeout ended the request (not a per-try timeout): no
# URX whatever the retry policy's tries, as Envoy's onResponseTimeout() asks
# no retry state (its URX comes only from a retry the state refused)
ROUTE_TIMEOUT = 1 << 22

# RESPONSE_CODE_DETAILS of a request refused for its Transfer-Encoding (a
# coding other than chunked alone: _peek_py's "Decisions"), Envoy's HTTP/1
# codec's words for it; l4proxy_refused_total's reason where the connection
# is routed by its first head.
INVALID_TE = "http1.invalid_transfer_encoding"

# RESPONSE_CODE_DETAILS of a request the drain's deadline cut (LOCAL_CUT):
# Envoy's words for a downstream connection it closed itself, with the
# reason it gives the connections still open when the drain time of what
# they came through runs out (it closes them then, as l4proxy does at
# --drain-duration's end). RESPONSE_FLAGS says DC, as Envoy's (it sets DC on
# a request whose connection closed before its response, either side's
# close).
DRAIN_CUT = "downstream_local_disconnect(filter_chain_is_being_removed)"

# A failure the retry policy retries (on_reset): URX when its tries are used up
# (not the route timeout's UT: ROUTE_TIMEOUT).
RETRIED_FAILURES = UT | UF | UC | UPE

# The longest each value may be once escaped (a longer one is cut: TRUNCATED)
CAPS = {
    "method": 32,
    "path": 1024,
    "protocol": 16,
    "x_forwarded_for": 256,
    "user_agent": 512,
    "request_id": 128,
    "authority": 256,
    "upstream_cluster": 384,
    "route_name": 256,
    "response_code_details": 128,
    "address": 64,
}

JSON_KEYS = (
    "start_time",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "response_code_details",
    "connection_termination_details",
    "upstream_transport_failure_reason",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
    "upstream_cluster",
    "upstream_local_address",
    "downstream_local_address",
    "downstream_remote_address",
    "requested_server_name",
    "route_name",
)


class TagLog(NamedTuple):
    """What the access log says of a request's tag (the relays' tags are
    their caller's: the worker's describe them): its upstream cluster and
    route name (empty: none, ``-``); for a request the route answered
    itself (the verdict's local answer), that answer's flags (NR: no
    route) and details."""

    upstream_cluster: str = ""
    route_name: str = ""
    flags: int = 0
    details: str = "direct_response"


NO_TAG = TagLog()


def _no_tag(tag: Any) -> TagLog:
    return NO_TAG


class AccessLog(NamedTuple):
    """A relay's access log: the fd its lines go to (the relay's writer
    owns a duplicate), the format, how a tag is described (:class:`TagLog`),
    and the bytes buffered before lines are dropped. *sink*: where the
    lines go instead of a writer of the relay's own (the compiled relay's
    buffer, for the pure relay it hands connections to)."""

    fd: int
    json: bool = False
    describe: Callable[[Any], TagLog] = _no_tag
    buffer: int = DEFAULT_BUFFER
    sink: Callable[[bytes], None] | None = None


class Record(NamedTuple):
    """One request's line, before formatting (the pure twin's; the compiled
    relay keeps the same in C). Bytes from the client as they came (None:
    absent); *flags*: the flag bits and the relays' other bits above."""

    start: float  # wall clock, seconds
    method: bytes | None
    path: bytes | None
    protocol: bytes | None
    status: int
    local: bool  # the proxy answered it (no upstream's final head went out)
    flags: int
    received: int
    sent: int
    duration_ms: int
    forwarded_for: bytes | None
    user_agent: bytes | None
    request_id: bytes | None
    authority: bytes | None
    upstream_host: str | None
    tag: TagLog
    upstream_local: str | None
    downstream_local: str | None
    downstream_remote: str | None


# -- escaping -------------------------------------------------------------------


def _unit(b: int, other: bytes) -> bytes:
    """Byte *b* escaped: a quote and a backslash after a backslash,
    printable ASCII as it is, any other byte by the *other* format
    (TEXT's ``\\xHH``, JSON's ``\\u00hh``)."""
    if b == 0x22:
        return b'\\"'
    if b == 0x5C:
        return b"\\\\"
    if 0x20 <= b < 0x7F:
        return bytes((b,))
    return other % b


_TEXT_UNITS = tuple(_unit(b, b"\\x%02X") for b in range(256))
_JSON_UNITS = tuple(_unit(b, b"\\u%04x") for b in range(256))


def utf8_length(value: bytes, i: int) -> int:
    """The length of the valid UTF-8 character that starts at ``value[i]``
    (2 to 4), 0 where none does (Unicode's well-formed sequences, RFC
    3629: no overlong form, no surrogate, nothing past U+10FFFF). The
    compiled relay's utf8_len() is its twin."""
    b, n = value[i], len(value)
    lo, hi = 0x80, 0xBF  # (the second byte's range)
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
    if i + k > n or not lo <= value[i + 1] <= hi:
        return 0
    if any(not 0x80 <= c <= 0xBF for c in value[i + 2 : i + k]):
        return 0
    return k


def _char(value: bytes, i: int, json: bool) -> tuple[bytes, int]:
    """The character at ``value[i]`` escaped, and its bytes: a valid UTF-8
    one from U+00A0 as it is, a C1 control (U+0080 to U+009F) escaped,
    any other byte alone by its escape (the tables')."""
    b = value[i]
    k = utf8_length(value, i) if b >= 0x80 else 0
    if not k:  # ASCII, or a byte of no valid character
        return (_JSON_UNITS if json else _TEXT_UNITS)[b], 1
    if b == 0xC2 and value[i + 1] < 0xA0:  # a C1 control
        c = value[i + 1]
        return (b"\\u%04x" % c if json else b"\\xC2\\x%02X" % c), 2
    return value[i : i + k], k


def _units(value: bytes, json: bool) -> list[bytes]:
    """*value* escaped, a unit per character (see "Escaping"): what a cut
    never splits."""
    if value.isascii():
        table = _JSON_UNITS if json else _TEXT_UNITS
        return [table[b] for b in value]
    out: list[bytes] = []
    i = 0
    while i < len(value):
        unit, took = _char(value, i, json)
        out.append(unit)
        i += took
    return out


def escape(value: bytes, cap: int, json: bool = False, keep_end: bool = False) -> bytes:
    """*value* escaped for a quoted field of a line (see "Escaping"), at
    most *cap* bytes: a longer one is cut at a whole escape or character
    and ends with TRUNCATED; with *keep_end*, its end is kept, after
    TRUNCATED (:func:`_end`). The compiled relay's log_escape() is its
    twin."""
    units = _units(value, json)
    out = b"".join(units)
    if len(out) <= cap:
        return out
    room = cap - len(TRUNCATED)
    if keep_end:
        return TRUNCATED + _end(value, len(out), room, json)
    cut = bytearray()
    for u in units:
        if len(cut) + len(u) > room:
            break
        cut += u
    return bytes(cut) + TRUNCATED


def _end(value: bytes, escaped: int, room: int, json: bool) -> bytes:
    """The end of *value* (*escaped* bytes once escaped) that fits *room*
    bytes escaped, from an element's start where one is in it: past a
    comma and the spaces after it (X-Forwarded-For's: the proxies in
    front append theirs, the client's own part is its beginning), else
    from the first whole character that fits. The compiled twin:
    log_escape_end()."""
    n = len(value)
    pos = 0
    while escaped > room:  # (the first character whose end fits)
        unit, took = _char(value, pos, json)
        escaped -= len(unit)
        pos += took
    start = before = pos
    while before > 0 and value[before - 1] in (0x20, 0x09):
        before -= 1
    if before > 0 and value[before - 1] != 0x2C:  # (within an element: the next one's)
        comma = value.find(b",", pos)
        start = n if comma < 0 else comma + 1
    while start < n and value[start] in (0x20, 0x09):
        start += 1
    if start < n:
        pos = start
    return b"".join(_units(value[pos:], json))


def flags_text(flags: int) -> str:
    """RESPONSE_FLAGS: the flag bits' names in Envoy's order, comma-joined;
    ``-`` for none."""
    names = [name for i, name in enumerate(FLAG_NAMES) if flags >> i & 1]
    return ",".join(names) if names else "-"


def final_flags(flags: int) -> int:
    """The flags a line shows of a request's bits: a request cut (CUT) with
    no other flag saying why is the client's going (DC)."""
    shown = flags & FLAGS
    if flags & CUT and not shown & ~(DI | URX):
        shown |= DC
    return shown


def shown_flags(flags: int, tag: TagLog) -> int:
    """The flag bits a request's line shows as RESPONSE_FLAGS: its bits'
    :func:`final_flags`, and for a route's own answer (LOCAL_VERDICT) its
    *tag*'s flags too (NR, NC). Istio's metrics label the request with the
    same (``response_flags``: l4proxy/sidecar/istio_metrics.py)."""
    shown = final_flags(flags)
    if flags & LOCAL_VERDICT:
        shown |= tag.flags
    return shown


def details(flags: int, status: int, local: bool, tag: TagLog) -> str:
    """RESPONSE_CODE_DETAILS of a request with these bits (:func:`final_flags`'),
    its *status*, whether the proxy answered it (*local*): Envoy's words for
    why the proxy answered, ``via_upstream`` for an upstream's answer. The
    compiled relay's log_details() is its twin."""
    after = not local and status > 0  # (a failure once the response had begun)
    if flags & PATH_REFUSED:
        return "path_normalization_failed"
    if flags & FI:
        return "fault_filter_abort"
    if flags & UH:
        return "no_healthy_upstream"
    if flags & UO:
        return "upstream_reset_before_response_started{overflow}"
    if flags & UF:
        return "upstream_reset_before_response_started{connection_failure}"
    if flags & OM:
        return "overload_manager"
    if flags & UT:
        return "upstream_response_timeout"
    if flags & UPE:
        if after:
            return "upstream_reset_after_response_started{protocol_error}"
        return "upstream_reset_before_response_started{protocol_error}"
    if flags & UC:
        if after:
            return "upstream_reset_after_response_started{connection_termination}"
        return "upstream_reset_before_response_started{connection_termination}"
    if flags & SI:
        return "stream_idle_timeout"
    if flags & DC:
        return DRAIN_CUT if flags & LOCAL_CUT else "downstream_remote_disconnect"
    if flags & DPE:
        return INVALID_TE if flags & TE_REFUSED else "http1.codec_error"
    if flags & LOCAL_VERDICT:
        return tag.details
    if local:
        return "direct_response"
    return "via_upstream"


def time_text(wall: float) -> bytes:
    """START_TIME: ``2024-05-01T12:00:00.123Z`` (UTC; Envoy's default
    ``%Y-%m-%dT%H:%M:%E3SZ``), milliseconds truncated."""
    ms = int(wall * 1000)
    sec, frac = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode() + b".%03dZ" % frac


# -- the line -----------------------------------------------------------------------


def _value(value: bytes | str | None, key: str, json: bool) -> bytes:
    """A quoted field's content (text), or a JSON value: ``-``/null when
    absent or empty (X-Forwarded-For cut: its end kept)."""
    if value is None or value == b"" or value == "":
        return b"null" if json else b"-"
    raw = value.encode("utf-8", "replace") if isinstance(value, str) else value
    out = escape(raw, CAPS[key], json, keep_end=key == "x_forwarded_for")
    return b'"' + out + b'"' if json else out


def format_line(rec: Record, json: bool = False) -> bytes:
    """The line of *rec* (its newline included), in the TEXT format or as
    JSON (see the module's docstring): at most LINE_MAX bytes."""
    flags = final_flags(rec.flags)
    local_verdict = bool(rec.flags & LOCAL_VERDICT)
    l4 = rec.flags & L4
    if l4:  # (tcp_proxy's: none, but for the drain's cut, as a request's)
        why = DRAIN_CUT if rec.flags & LOCAL_CUT else None
    else:
        why = details(flags | (rec.flags & ~FLAGS), rec.status, rec.local, rec.tag)
    shown = shown_flags(rec.flags, rec.tag)
    cluster = None if local_verdict else rec.tag.upstream_cluster
    # (a connection routed at L4 that the drain cut had its upstream: kept)
    kept = DI | URX | (DC if l4 else 0)
    upstream_local = None if flags & ~kept or rec.local else rec.upstream_local
    fields: list[tuple[str, bytes]] = [
        ("start_time", b'"' + time_text(rec.start) + b'"' if json else time_text(rec.start)),
        ("method", _value(rec.method, "method", json)),
        ("path", _value(rec.path, "path", json)),
        ("protocol", _value(rec.protocol, "protocol", json)),
        ("response_code", b"%d" % rec.status),
        ("response_flags", _quoted(flags_text(shown), json)),
        ("response_code_details", _value(why, "response_code_details", json)),
        ("connection_termination_details", _value(None, "address", json)),
        ("upstream_transport_failure_reason", _value(None, "address", json)),
        ("bytes_received", b"%d" % rec.received),
        ("bytes_sent", b"%d" % rec.sent),
        ("duration", b"%d" % rec.duration_ms),
        ("upstream_service_time", _value(None, "address", json)),
        ("x_forwarded_for", _value(rec.forwarded_for, "x_forwarded_for", json)),
        ("user_agent", _value(rec.user_agent, "user_agent", json)),
        ("request_id", _value(rec.request_id, "request_id", json)),
        ("authority", _value(rec.authority, "authority", json)),
        ("upstream_host", _value(rec.upstream_host, "address", json)),
        ("upstream_cluster", _value(cluster, "upstream_cluster", json)),
        ("upstream_local_address", _value(upstream_local, "address", json)),
        ("downstream_local_address", _value(rec.downstream_local, "address", json)),
        ("downstream_remote_address", _value(rec.downstream_remote, "address", json)),
        ("requested_server_name", _value(None, "address", json)),
        ("route_name", _value(rec.tag.route_name, "route_name", json)),
    ]
    if json:
        return b"{" + b",".join(b'"%s":%s' % (k.encode(), v) for k, v in fields) + b"}\n"
    v = dict(fields)
    return b"".join(
        (
            b"[%s] " % v["start_time"],
            b'"%s %s %s" ' % (v["method"], v["path"], v["protocol"]),
            b"%s %s %s " % (v["response_code"], v["response_flags"], v["response_code_details"]),
            b'%s "%s" '
            % (v["connection_termination_details"], v["upstream_transport_failure_reason"]),
            b"%s %s %s %s "
            % (v["bytes_received"], v["bytes_sent"], v["duration"], v["upstream_service_time"]),
            b'"%s" "%s" "%s" "%s" '
            % (v["x_forwarded_for"], v["user_agent"], v["request_id"], v["authority"]),
            b'"%s" %s %s '
            % (v["upstream_host"], v["upstream_cluster"], v["upstream_local_address"]),
            b"%s %s " % (v["downstream_local_address"], v["downstream_remote_address"]),
            b"%s %s\n" % (v["requested_server_name"], v["route_name"]),
        )
    )


def connection_record(
    start: float,
    flags: int,
    received: int,
    sent: int,
    duration_ms: int,
    upstream_host: str | None,
    cluster: str,
    upstream_local: str | None,
    downstream_local: str | None,
    downstream_remote: str | None,
) -> Record:
    """The line of a connection routed at L4 (a TCP port's, bytes on an
    HTTP port that are not HTTP), as Envoy's tcp_proxy logs it: no method,
    path, protocol, header nor route (``"- - -"``), RESPONSE_CODE 0, no
    RESPONSE_CODE_DETAILS; *received* and *sent* the bytes each way,
    *duration_ms* the connection's life, *cluster* its UPSTREAM_CLUSTER
    (empty: none), *flags* why no upstream took it (UH, UF and URX, UO,
    NR, OM; none for how an established one ended, as tcp_proxy's, but
    for the drain's deadline: DC with LOCAL_CUT, whose line says what a
    request's cut so says, ``DC`` and :data:`DRAIN_CUT`, its upstream's
    local address kept)."""
    return Record(
        start,
        None,
        None,
        None,
        0,
        False,
        flags | L4,
        received,
        sent,
        duration_ms,
        None,
        None,
        None,
        None,
        upstream_host,
        TagLog(cluster),
        upstream_local,
        downstream_local,
        downstream_remote,
    )


def address_text(addr: Any) -> str | None:
    """``ip:port``, ``[ip6]:port`` of a (host, port, ...) tuple (an endpoint,
    a socket address; Envoy's; an IPv4-mapped address as IPv4, as the
    compiled twin's l4_sa_text()); None for anything else."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    host = str(addr[0]).partition("%")[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def origin_address(origin: Any) -> str | None:
    """Where a client was going, as DOWNSTREAM_LOCAL_ADDRESS says it: its
    origin's address (``ip``, ``port``; the original destination), None
    when it has none (a gateway listener's: then the socket's own
    address)."""
    ip, port = getattr(origin, "ip", None), getattr(origin, "port", None)
    return address_text((ip, port)) if isinstance(ip, str) and isinstance(port, int) else None


def connection_addresses(
    sock: socket.socket, origin: Any, peer: Any = None
) -> tuple[str | None, str | None]:
    """A client connection's DOWNSTREAM_LOCAL_ADDRESS (origin_address(),
    else this side's, a gateway listener's) and DOWNSTREAM_REMOTE_ADDRESS
    (*peer*, the client's address as accept() returned it; None: asked of
    the kernel, which has none once the client reset the connection)."""
    local = origin_address(origin)
    remote = address_text(peer) if peer is not None else None
    try:
        if local is None:
            local = address_text(sock.getsockname())
        if peer is None:
            remote = address_text(sock.getpeername())
    except OSError:
        pass
    return local, remote


def _quoted(text: str, json: bool) -> bytes:
    return b'"%s"' % text.encode() if json else text.encode()


# -- the writer ---------------------------------------------------------------------


def chunks(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """*data* (whole lines) in writes of at most LINE_MAX bytes, each ending
    at a line's end: a write of at most PIPE_BUF bytes to a pipe is atomic,
    so lines several processes write to one pipe never interleave; a line
    is never longer (format_line)."""
    view = memoryview(data)
    start, n = 0, len(view)
    while start < n:
        end = min(start + LINE_MAX, n)
        if end < n:
            cut = bytes(view[start:end]).rfind(b"\n")
            end = start + cut + 1 if cut >= 0 else end
        yield view[start:end]
        start = end


class LineWriter:
    """Lines to an fd from a thread of its own, never waited for.

    :meth:`line` appends to a buffer of at most *limit* bytes under a lock
    and returns: a relay's thread never blocks on the log's fd (a pipe
    whose reader stopped, a slow disk). A line that does not fit is
    dropped and counted (:attr:`dropped`). The writer thread takes the
    buffer whole every 0.1 s, or at once when it is half full or a flush
    is asked, and writes it in :func:`chunks`; a write error (EPIPE,
    ENOSPC, EBADF...) drops the rest of that batch, counted in
    :attr:`errors` and :attr:`dropped`, logged once at warning; the writer
    goes on with the next batch. A line a short write began in a file (a
    full disk) that the next write cannot end is cut off the file again
    (:meth:`_cut`): no torn line for the next one to be glued to. An fd set non-blocking (EAGAIN) is
    waited on for 0.1 s at a time. The fd is the writer's own (closed by
    :meth:`close`)."""

    def __init__(self, fd: int, limit: int = DEFAULT_BUFFER) -> None:
        self.fd = fd
        self.limit = max(limit, LINE_MAX)
        self.lines = 0  # lines taken into the buffer
        self.dropped = 0  # lines lost: the buffer full, or a write that failed
        self.errors = 0  # write()s that failed
        self._warned = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._buf = bytearray()
        self._writing = False
        self._stop = False
        self._running = True
        self._orphan = False  # close() gave up on the thread: it closes the fd as it ends
        # a reopen (SIGUSR1): the fd to switch to once batch _reopen_after
        # (the one holding every line taken before it) is written, or, when
        # that batch was still being taken (_reopen_split: its length at the
        # reopen), once the part before the lines taken after it is
        self._reopen_fd: int | None = None
        self._batches = 0
        self._reopen_after = 0
        self._reopen_split = 0  # (0: the whole batch)
        self._thread = threading.Thread(target=self._run, name="l4proxy-access-log", daemon=True)
        self._thread.start()

    def line(self, data: bytes) -> None:
        """Append one line (or drop it: the buffer is full)."""
        with self._lock:
            if self._stop or len(self._buf) + len(data) > self.limit:
                self.dropped += 1
                return
            self._buf += data
            self.lines += 1
            if len(self._buf) >= self.limit // 2:
                self._wake.notify()

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait until what is buffered was written (at most *timeout* s:
        a reader that stopped reading must not hold a drain); whether it was."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._wake.notify()
            while self._buf or self._writing:
                left = deadline - time.monotonic()
                if left <= 0 or not self._running:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Flush (within *timeout*), stop the thread, close the fd; a writer
        still blocked in write() (a reader that stopped) closes it itself
        if that write ever ends."""
        with self._lock:
            if self._stop:
                return
        flushed = self.flush(timeout)
        with self._lock:
            self._stop = True
            self._wake.notify()
        self._thread.join(0.5 if flushed else 0.0)
        with self._lock:
            if self._running:
                self._orphan = True
                return
        os.close(self.fd)

    def reopen(self, fd: int) -> bool:
        """Write to *fd*'s file from now on (--access-log reopened: SIGUSR1):
        the lines taken so far still go to the file open now; the writer
        duplicates *fd* onto its own fd after the batch that holds them,
        so a log rotated by renaming keeps every line of its period. *fd*
        stays the caller's. False once closed."""
        new = os.dup(fd)
        with self._lock:
            if self._stop:
                os.close(new)
                return False
            if self._reopen_fd is not None:  # (a later reopen wins)
                os.close(self._reopen_fd)
            self._reopen_fd = new
            self._reopen_after = self._batches + (1 if self._buf else 0)
            # (lines taken after this one, into the same buffer before the
            # writer takes it, are the new file's)
            self._reopen_split = len(self._buf)
            if not self._writing and not self._buf:
                self._switch()
            else:
                self._wake.notify()
            return True

    def _switch(self) -> None:  # (the lock held, no write under way)
        assert self._reopen_fd is not None
        os.dup2(self._reopen_fd, self.fd, inheritable=False)
        os.close(self._reopen_fd)
        self._reopen_fd = None

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "access_log_lines": self.lines,
                "access_log_dropped": self.dropped,
                "access_log_write_errors": self.errors,
            }

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._buf and not self._stop:
                    self._wake.wait(0.1)
                    if self._buf:
                        break
                if not self._buf and self._stop:
                    self._running = False
                    self._idle.notify_all()
                    if self._orphan:
                        os.close(self.fd)
                    if self._reopen_fd is not None:
                        os.close(self._reopen_fd)
                        self._reopen_fd = None
                    return
                batch, self._buf = self._buf, bytearray()
                self._writing = True
                self._batches += 1
                split = 0
                if self._reopen_fd is not None and self._batches == self._reopen_after:
                    split = self._reopen_split
            try:
                if 0 < split < len(batch):  # a reopen came while this batch was taken
                    self._write(batch[:split])
                    with self._lock:
                        if self._reopen_fd is not None:
                            self._switch()
                    batch = batch[split:]
                self._write(batch)
            finally:
                with self._lock:
                    self._writing = False
                    if self._reopen_fd is not None and self._batches >= self._reopen_after:
                        self._switch()
                    self._idle.notify_all()

    def _write(self, batch: bytearray) -> None:
        data = memoryview(batch)
        pos = 0
        torn_end = -1  # a short write's: the file's size after it (_cut)
        for chunk in chunks(data):
            end = pos + len(chunk)
            while pos < end:
                try:
                    w = os.write(self.fd, data[pos:end])
                    if w == 0:  # (nothing written: not a loop that spins)
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    pos += w
                    torn_end = _file_size(self.fd) if pos < end else -1
                except BlockingIOError:  # (a non-blocking fd: wait for room)
                    if self._stop:  # (closing, its flush given up)
                        self._lost(data[pos:], errno.EAGAIN)
                        return
                    _wait_writable(self.fd, 0.1)
                except OSError as exc:
                    if torn_end >= 0:
                        pos = self._cut(batch, pos, torn_end)
                    self._lost(data[pos:], exc.errno or 0)
                    return

    def _cut(self, batch: bytearray, pos: int, torn_end: int) -> int:
        """A write failed after a short one left batch[line:pos], a line's
        start, at the end of a regular file (of size *torn_end* then, a
        full disk): cut it off again while no write came after it (the size
        unchanged: another worker's append on a full disk fails as ours
        did), so the file holds whole lines only, the next one not glued to
        it; the line is dropped with the rest. Where the rest begins: the
        line's start, or *pos* when it stays (l4_alog_cut's twin)."""
        line = batch.rfind(b"\n", 0, pos) + 1
        frag = pos - line
        if frag == 0 or torn_end < frag or _file_size(self.fd) != torn_end:
            return pos
        try:
            os.ftruncate(self.fd, torn_end - frag)
        except OSError:
            return pos
        return line

    def _lost(self, rest: memoryview, err: int) -> None:
        """A write failed: the rest of the batch is dropped, counted, the
        first time logged."""
        lost = bytes(rest).count(b"\n")
        with self._lock:
            self.errors += 1
            self.dropped += lost
            warn = not self._warned
            self._warned = True
        if warn:
            log.warning(
                "access log: a write failed (%s): %d line(s) dropped; later failures are "
                "counted in l4proxy_access_log_write_errors_total, not logged",
                os.strerror(err) if err else "error",
                lost,
            )


def _file_size(fd: int) -> int:
    """A regular file's size; -1 for any other fd (a pipe: its writes of a
    line are whole)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def _wait_writable(fd: int, timeout: float) -> None:
    p = select.poll()
    p.register(fd, select.POLLOUT)
    p.poll(timeout * 1000)

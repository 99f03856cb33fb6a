"""Peek at an HTTP/1.x request head: the pure-Python twin, and the shared types.

The sidecar reads just enough of a client's first bytes to route the
connection (Host, method, path, headers), then forwards every byte it read,
unchanged, upstream. This module decides, from a growing prefix of the
stream, one of three things: "here is the request head", "need more bytes",
or an error (:class:`HeadError`; :class:`NotHTTP` when the bytes are not an
HTTP/1.x request at all and the proxy should route at L4 instead).

It is sans-IO: bytes in, a result out, no sockets. ``ext/peek.pyx`` is its
compiled twin; both follow the same state machine line for line and pass the
same tests (``tests/test_peek.py``), and ``l4proxy.dataplane.peek`` picks one. The
exception classes and :class:`RequestHead` live here only, so that both twins
raise and return the very same types.

Theory of operation
-------------------
The buffer is scanned once, left to right, and the scan position is kept
between calls to :meth:`HeadParser.feed`, so feeding one byte at a time costs
O(n) in total, not O(n²).

1. *Request line*, one byte at a time through a small state machine
   (``_S_EMPTY`` ... ``_S_VCR``). Empty lines before it are skipped
   (RFC 9112 §2.2 says a server SHOULD ignore at least one). The machine
   exists so that non-HTTP bytes are recognised early: the first byte that
   cannot start a method, a method that is not followed by SP, a target with
   a control byte, or a version that does not start with ``HTTP/`` raises
   :class:`NotHTTP` at once, without waiting for 64 KiB. The machine stays
   byte-wise; the pure twin only skips runs of method and target bytes with a
   regular expression, which changes nothing but speed.
2. *Header lines*, a whole line at a time: search the next LF from where the
   last search stopped; each complete line is validated when its LF arrives
   (so a bad header is answered with 400 before the head is complete). An
   incomplete last line is not judged yet.
3. *Completion*: the first empty line ends the head. Only then are the
   Python objects built and the cross-header rules checked (Host,
   Content-Length, Transfer-Encoding), in a fixed order.

Only the first ``max_head`` bytes are ever scanned. If they hold neither a
complete head nor an error, and more than ``max_head`` bytes were fed, the
answer is 431. This makes the outcome a function of the bytes alone, not of
how they were split across calls: a fixed prefix decides.

Decisions (RFC 9112 leaves them to the recipient)
-------------------------------------------------
* A bare LF (an LF without the CR before it) ending the request line, a
  header line or the empty line that ends the head is a 400, as llhttp
  (strict) and Node refuse it. §2.2 lets a recipient recognize a single LF
  as a line end, but we forward the head as sent: a server that ends lines
  only at CRLF (and reads an LF inside a value as SP, RFC 9110 §5.5) would
  read ``X: y\nContent-Length: 5`` as one field, no body, and the body we
  framed by that Content-Length as another request, one no route saw
  (HAProxy and nginx rewrite the head with CRLF instead). Empty lines
  before the request line may still end in a bare LF: they are skipped and
  never sent. A CR that is not followed by LF is a 400 too (§2.2 allows
  rejecting it; replacing it with SP is not an option because we forward
  the bytes verbatim).
* obs-fold (a header line starting with SP or HTAB) is a 400. §5.2 allows
  rejecting it or unfolding it before forwarding; we never rewrite the bytes
  we forward (a hop-by-hop line is dropped whole, never edited), so
  unfolding would make us read a header that the upstream reads
  differently. The same rule rejects whitespace before the first
  header (§2.2).
* Whitespace between a header name and its colon is a 400 (§5.1, MUST).
* HTTP/1.1 (and 1.x, x >= 1) without Host, or with more than one Host, is a
  400 (§3.2, MUST). HTTP/1.0 may omit it.
* An absolute-form target's authority wins over Host (§3.2.2): it is what
  the request is routed by. A Host header that names another host (ASCII
  case and a default port written on one side aside; an empty one too) is
  a 400, as HAProxy answers it. §3.2.2 has a proxy send such a request
  with a Host made from the target (MUST); we forward the head as sent, so
  an upstream that reads Host, not the target, would serve another host
  than the one the request was routed by.
* Content-Length: a comma list of equal values ("5, 5") and repeated equal
  headers are accepted (§6.3; the relay sends them on as one line, RFC
  9110 §8.6: "One Content-Length" in _exchange_py.py); differing values, a
  non-digit, an empty element, or more than 18 digits are a 400. Content-Length together with
  Transfer-Encoding is a 400 (§6.1 allows it; it is the request-smuggling
  case). Transfer-Encoding, over all its lines, must be exactly one
  ``chunked`` (ASCII case aside, OWS around it): any other list
  (``gzip, chunked``, ``identity, chunked``, ``,chunked``, ``chunked,``,
  a second line, an empty one, ``chunked;x=1``) is a 501 and the
  connection closes, as Envoy answers it (``http1.invalid_transfer_encoding``;
  Go's net/http and nginx 501, HAProxy 422). §6.1 lets a proxy forward
  other codings, but we forward the bytes as sent, and a server that reads
  a body as chunked only when the field says exactly ``chunked`` (else by
  Content-Length, or none) would read the chunked body as further requests.
  In an HTTP/1.0 request Transfer-Encoding is a 400 (§6.1 says its framing
  is faulty).
* ``PRI * HTTP/2.0`` (the HTTP/2 prior-knowledge preface) is :class:`NotHTTP`,
  so h2c traffic is routed at L4 and works. Any other major version is 505.
* A method longer than 32 bytes is :class:`NotHTTP`: the longest registered
  method has 17 characters, and this lets a long run of letters (a base64
  blob, say) be passed through at L4 quickly.
* The request-target must be visible ASCII (0x21-0x7E); header values may
  carry obs-text (0x80-0xFF) and are decoded as Latin-1.
* A path with a dot-segment is a 400: a segment ``.`` or ``..``, each dot
  also written ``%2e`` or ``%2E`` (``/a/../b``, ``/a/%2e%2E/b``, ``/a/.``,
  ``/..``), in an origin-form target or the path of an absolute-form one.
  Routes match the path as sent (Ingress paths, uri matches) and we forward
  it as sent, so a server that removes dot-segments (RFC 3986 §5.2.4) would
  serve ``/private`` for ``/public/../private``, routed by ``/public``.
  Envoy (Istio's default ``pathNormalization: BASE``) normalizes the path
  before it routes and forwards that; we never rewrite the target we
  forward, so we refuse. The path is the target up to its first ``?`` (a query is
  not a path); a segment ends at ``/``, ``\\``, ``#`` or there. A raw ``\\``
  separates segments here (``/public\\..\\private``): Envoy's normalization
  turns it into ``/`` (Chromium's URL canonicalizer), as some servers do. A
  ``#`` cannot appear in a request-target (RFC 9112 §3.2) and servers read it
  either way, so the check reads on past it. Not refused: ``...``,
  ``.hidden``, ``b..c`` (ordinary segments); a ``\\`` or ``#`` elsewhere
  (llhttp and HAProxy pass ``\\`` on untouched); ``%2f`` and ``%5c``: an
  encoded slash or backslash is data, not a separator, and Envoy keeps them
  unchanged by default (``pathWithEscapedSlashes`` ``KEEP_UNCHANGED``), so
  ``/public/..%2fprivate`` is routed by ``/public`` there too.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

__all__ = ["HeadError", "HeadParser", "NotHTTP", "RequestHead", "parse_head"]

DEFAULT_MAX_HEAD: Final = 65536
MAX_METHOD: Final = 32  # see "Decisions" above
MAX_CL_DIGITS: Final = 18  # fits a signed 64-bit integer in the compiled twin


class HeadError(Exception):
    """The request head cannot be accepted; answer ``status`` and close.

    ``status`` is 400 (malformed), 431 (head too large), 501 (a
    Transfer-Encoding other than ``chunked``) or 505 (HTTP version not
    supported); ``reason`` says what was wrong, for logs; ``details``,
    where it is not empty, is Envoy's RESPONSE_CODE_DETAILS for it (the
    access log's, and l4proxy_refused_total's reason), else the caller's
    own for a malformed head.
    """

    def __init__(self, status: int, reason: str, details: str = "") -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.details = details

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class NotHTTP(HeadError):
    """The bytes are not an HTTP/1.x request: route at L4, forward them untouched."""


class RequestHead(NamedTuple):
    """A parsed request head. Immutable; equal heads compare equal.

    ``target`` is the raw request-target. ``path`` is what a route matches:
    the target itself in origin-form (query included), the path and query of
    an absolute-form target (``"/"`` when it has none), ``"*"`` in
    asterisk-form and ``""`` for CONNECT; it never has a dot-segment (a head
    whose path has one is refused, see "Decisions"). ``host`` is the
    authority of an absolute-form or CONNECT target when there is one (it
    wins over the Host header, RFC 9112 §3.2.2; an absolute-form head whose
    Host names another host is refused), else the Host header as sent,
    else None.
    ``head_length`` counts every byte of the head from the start of the
    stream, skipped empty lines and the final empty line included: the body
    (or the next request) starts at ``buffered[head_length:]``.
    ``headers`` keeps order and duplicates: names lowercased, values with
    surrounding whitespace removed.
    """

    method: str
    target: str
    path: str
    version: str
    headers: tuple[tuple[str, str], ...]
    host: str | None
    head_length: int
    keep_alive: bool
    content_length: int | None
    chunked: bool
    expect_continue: bool

    def header(self, name: str) -> str | None:
        """The first value of header *name* (any case), or None."""
        if not name.isascii():  # str.lower() maps e.g. KELVIN SIGN to "k"
            return None
        key = name.lower()
        for k, v in self.headers:
            if k == key:
                return v
        return None


# Error codes. The compiled twin uses the same numbers and the same table, so
# the twins raise identical errors. 0 means "need more bytes", 1 "complete".
NEED_MORE: Final = 0
COMPLETE: Final = 1
E_NOT_HTTP_START: Final = 2
E_NOT_HTTP_METHOD: Final = 3
E_NOT_HTTP_METHOD_LONG: Final = 4
E_NOT_HTTP_TARGET: Final = 5
E_NOT_HTTP_VERSION: Final = 6
E_NOT_HTTP_H2: Final = 7
E_VERSION: Final = 8
E_REQUEST_LINE_CR: Final = 9
E_VERSION_UNSUPPORTED: Final = 10
E_OBS_FOLD: Final = 11
E_EMPTY_NAME: Final = 12
E_NO_COLON: Final = 13
E_NAME_CHAR: Final = 14
E_VALUE_CHAR: Final = 15
E_HOST_MANY: Final = 16
E_HOST_MISSING: Final = 17
E_HOST_INVALID: Final = 18
E_TARGET: Final = 19
E_CL_INVALID: Final = 20
E_CL_CONFLICT: Final = 21
E_TE_HTTP10: Final = 22
E_TE_NOT_CHUNKED: Final = 23
E_CL_AND_TE: Final = 24
E_TOO_LARGE: Final = 25
E_DOT_SEGMENT: Final = 26
E_HOST_CONFLICT: Final = 27
E_BARE_LF: Final = 28

ERRORS: Final[dict[int, tuple[type[HeadError], int, str]]] = {
    E_NOT_HTTP_START: (NotHTTP, 400, "not HTTP: bad first byte"),
    E_NOT_HTTP_METHOD: (NotHTTP, 400, "not HTTP: bad byte in the method"),
    E_NOT_HTTP_METHOD_LONG: (NotHTTP, 400, "not HTTP: method longer than 32 bytes"),
    E_NOT_HTTP_TARGET: (NotHTTP, 400, "not HTTP: bad byte in the request-target"),
    E_NOT_HTTP_VERSION: (NotHTTP, 400, "not HTTP: no HTTP/ version after the target"),
    E_NOT_HTTP_H2: (NotHTTP, 400, "not HTTP/1.x: HTTP/2 connection preface"),
    E_VERSION: (HeadError, 400, "malformed HTTP version"),
    E_REQUEST_LINE_CR: (HeadError, 400, "CR without LF in the request line"),
    E_VERSION_UNSUPPORTED: (HeadError, 505, "HTTP version not supported"),
    E_OBS_FOLD: (HeadError, 400, "header line starts with whitespace (obs-fold)"),
    E_EMPTY_NAME: (HeadError, 400, "empty header name"),
    E_NO_COLON: (HeadError, 400, "header line without a colon"),
    E_NAME_CHAR: (HeadError, 400, "invalid character in header name"),
    E_VALUE_CHAR: (HeadError, 400, "invalid character in header value"),
    E_HOST_MANY: (HeadError, 400, "more than one Host header"),
    E_HOST_MISSING: (HeadError, 400, "HTTP/1.1 request without Host header"),
    E_HOST_INVALID: (HeadError, 400, "invalid Host header"),
    E_TARGET: (HeadError, 400, "invalid request-target"),
    E_CL_INVALID: (HeadError, 400, "invalid Content-Length"),
    E_CL_CONFLICT: (HeadError, 400, "conflicting Content-Length values"),
    E_TE_HTTP10: (HeadError, 400, "Transfer-Encoding in an HTTP/1.0 request"),
    E_TE_NOT_CHUNKED: (HeadError, 501, "Transfer-Encoding other than chunked"),
    E_CL_AND_TE: (HeadError, 400, "both Content-Length and Transfer-Encoding"),
    E_TOO_LARGE: (HeadError, 431, "request head larger than {max_head} bytes"),
    E_DOT_SEGMENT: (HeadError, 400, "dot-segment (. or ..) in the request path"),
    E_HOST_CONFLICT: (HeadError, 400, "Host header differs from the request-target's authority"),
    E_BARE_LF: (HeadError, 400, "LF without CR in the request head"),
}


# Envoy's RESPONSE_CODE_DETAILS for the errors that have their own (the
# others are its http1.codec_error): HeadError.details.
DETAILS: Final[dict[int, str]] = {
    E_TE_NOT_CHUNKED: "http1.invalid_transfer_encoding",
}


def make_error(code: int, max_head: int) -> HeadError:
    """The exception for error *code* (shared by both twins)."""
    cls, status, reason = ERRORS[code]
    return cls(status, reason.format(max_head=max_head), DETAILS.get(code, ""))


# States of the request-line machine; the compiled twin uses the same values.
_S_EMPTY: Final = 0  # before the request line: skipping empty lines
_S_EMPTY_CR: Final = 1  # ... saw CR, need LF
_S_METHOD: Final = 2
_S_TARGET0: Final = 3  # after "METHOD SP": the target's first byte
_S_TARGET: Final = 4
_S_VERSION: Final = 5  # matching b"HTTP/" (index in _vi)
_S_VMAJOR: Final = 6
_S_VDOT: Final = 7
_S_VMINOR: Final = 8
_S_VEND: Final = 9  # after "HTTP/d.d": need CR or LF
_S_VCR: Final = 10
_S_HEADERS: Final = 11
_S_DONE: Final = 12
_S_ERROR: Final = 13

_LF: Final = 0x0A
_CR: Final = 0x0D
_SP: Final = 0x20
_HTAB: Final = 0x09

_TCHARS: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TCHAR: Final = frozenset(_TCHARS)
_DIGIT: Final = frozenset(b"0123456789")
_TCHAR_RUN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_VCHAR_RUN: Final = re.compile(rb"[\x21-\x7e]*")
# A header line that needs no further thought; anything else is classified
# by _header_line_error().
_HEADER_LINE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")
_OWS: Final = b" \t"
# Characters of a Host value / URI authority: unreserved, pct-encoded,
# sub-delims, ":" and the IP-literal brackets (RFC 3986 §3.2). No "@":
# userinfo is rejected (RFC 9110 §4.2.4).
_HOST: Final = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]*")
_SCHEME: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*://")
# The port an authority may leave out, by scheme (lowercase).
_DEFAULT_PORT: Final = {b"http": b":80", b"https": b":443"}
_H2_PREFACE_LINE: Final = b"PRI * HTTP/2.0"
# A dot-segment of a path (see "Decisions"): "/" or "\", then "." or ".." (each
# dot also as %2e, any case), then the segment's end. Searched up to the
# target's first "?" only: "#" ends a segment but does not end the search.
_DOT_SEGMENT: Final = re.compile(rb"[/\\](?:\.|%2[eE]){1,2}(?:[/\\#]|\Z)")


def same_authority(scheme: bytes, authority: bytes, host: bytes) -> bool:
    """Whether the Host header's value *host* names the authority of an
    absolute-form target of *scheme*: equal but for ASCII case and a
    default port written on one side only (``http://a/`` and ``a:80``)."""
    port = _DEFAULT_PORT.get(scheme.lower(), b"")

    def bare(value: bytes) -> bytes:
        value = value.lower()
        return value[: -len(port)] if port and value.endswith(port) else value

    return bare(authority) == bare(host)


def has_dot_segment(target: bytes | bytearray, start: int = 0, end: int = -1) -> bool:
    """Whether the path that starts at ``target[start]`` (up to *end*, or the
    end) has a dot-segment: a segment ``.`` or ``..``, percent-encoded or
    not (see "Decisions"). The compiled twin's ``has_dot_segment``."""
    if end < 0:
        end = len(target)
    q = target.find(b"?", start, end)
    return _DOT_SEGMENT.search(target, start, end if q < 0 else q) is not None


def _header_line_error(line: bytes | bytearray, start: int, end: int) -> int:
    """Why ``line[start:end]`` (non-empty, CR stripped) is not a header line.

    The checks and their order are the compiled twin's ``check_header_line``.
    """
    c = line[start]
    if c in (_SP, _HTAB):
        return E_OBS_FOLD
    if c == 0x3A:  # ":"
        return E_EMPTY_NAME
    m = _TCHAR_RUN.match(line, start, end)
    i = m.end() if m else start
    if i == end:
        return E_NO_COLON
    if line[i] != 0x3A:
        return E_NAME_CHAR
    return E_VALUE_CHAR


class HeadParser:
    """Incremental request-head parser for one connection (sans-IO).

    ``feed(data)`` appends *data* and returns the :class:`RequestHead` once
    the head is complete (and again on every later call), ``None`` while more
    bytes are needed, or raises :class:`HeadError` / :class:`NotHTTP` (and
    raises it again on every later call). ``buffered`` is every byte fed so
    far, body bytes after the head included: the proxy forwards exactly these.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_head",
        "_headers_start",
        "_line_start",
        "_max_head",
        "_method_end",
        "_method_start",
        "_pos",
        "_state",
        "_steps",
        "_target_end",
        "_vi",
    )

    def __init__(self, max_head: int = DEFAULT_MAX_HEAD) -> None:
        if max_head < 1:
            raise ValueError(f"max_head must be at least 1, not {max_head}")
        self._max_head = max_head
        self._buf = bytearray()
        self._state = _S_EMPTY
        self._error = 0
        self._head: RequestHead | None = None
        self._pos = 0  # next byte to scan; everything before it is judged
        self._method_start = 0
        self._method_end = 0
        self._target_end = 0
        self._vi = 0  # index into b"HTTP/" while in _S_VERSION
        self._line_start = 0  # start of the current header line
        self._headers_start = 0  # first byte after the request line
        self._steps = 0  # loop turns + bytes handed to each search (tests)

    @property
    def steps(self) -> int:
        """Work the scanner has done: loop turns plus bytes handed to each search.

        For tests (an operation count that a quadratic rescan would blow up);
        the compiled twin counts the same way.
        """
        return self._steps

    @property
    def buffered(self) -> bytes:
        """Every byte fed so far, in order."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> RequestHead | None:
        """Append *data*; return the head once complete, None if more is needed."""
        if self._state == _S_DONE:
            self._buf += data
            return self._head
        if self._state == _S_ERROR:
            self._buf += data
            raise make_error(self._error, self._max_head)
        self._buf += data
        n = len(self._buf)
        limit = n if n < self._max_head else self._max_head
        code = self._scan(limit)
        if code == NEED_MORE and n > self._max_head:
            code = E_TOO_LARGE
        if code == COMPLETE:
            self._state = _S_DONE
            return self._head
        if code == NEED_MORE:
            return None
        self._state = _S_ERROR
        self._error = code
        raise make_error(code, self._max_head)

    # -- the scanner: mirrors scan() in ext/peek.pyx -------------------------

    def _scan(self, limit: int) -> int:
        buf = self._buf
        pos = self._pos
        state = self._state
        steps = self._steps
        try:
            while pos < limit:
                steps += 1
                if state == _S_HEADERS:
                    steps += limit - pos
                    lf = buf.find(b"\n", pos, limit)
                    if lf < 0:
                        pos = limit
                        break
                    start = self._line_start
                    if lf == start or buf[lf - 1] != _CR:  # see "Decisions"
                        return E_BARE_LF
                    end = lf - 1
                    if end == start:  # the empty line: the head is complete
                        pos = lf + 1
                        return self._complete(lf + 1)
                    if not _HEADER_LINE.fullmatch(buf, start, end):
                        return _header_line_error(buf, start, end)
                    pos = self._line_start = lf + 1
                    continue
                c = buf[pos]
                if state == _S_EMPTY:
                    if c == _LF:
                        pos += 1
                    elif c == _CR:
                        state = _S_EMPTY_CR
                        pos += 1
                    elif c in _TCHAR:
                        state = _S_METHOD
                        self._method_start = pos
                    else:
                        return E_NOT_HTTP_START
                elif state == _S_EMPTY_CR:
                    if c != _LF:
                        return E_NOT_HTTP_START
                    state = _S_EMPTY
                    pos += 1
                elif state == _S_METHOD:
                    steps += limit - pos
                    m = _TCHAR_RUN.match(buf, pos, limit)
                    end = m.end() if m else pos
                    if end - self._method_start > MAX_METHOD:
                        return E_NOT_HTTP_METHOD_LONG
                    pos = end
                    if pos == limit:
                        break
                    if buf[pos] != _SP:
                        return E_NOT_HTTP_METHOD
                    self._method_end = pos
                    state = _S_TARGET0
                    pos += 1
                elif state == _S_TARGET0:
                    if not 0x21 <= c <= 0x7E:
                        return E_NOT_HTTP_TARGET
                    state = _S_TARGET
                    pos += 1
                elif state == _S_TARGET:
                    steps += limit - pos
                    m = _VCHAR_RUN.match(buf, pos, limit)
                    pos = m.end() if m else pos
                    if pos == limit:
                        break
                    if buf[pos] != _SP:
                        return E_NOT_HTTP_TARGET
                    self._target_end = pos
                    state = _S_VERSION
                    self._vi = 0
                    pos += 1
                elif state == _S_VERSION:
                    if c != b"HTTP/"[self._vi]:
                        return E_NOT_HTTP_VERSION
                    self._vi += 1
                    if self._vi == 5:
                        state = _S_VMAJOR
                    pos += 1
                elif state in (_S_VMAJOR, _S_VMINOR):
                    if c not in _DIGIT:
                        return E_VERSION
                    state = _S_VDOT if state == _S_VMAJOR else _S_VEND
                    pos += 1
                elif state == _S_VDOT:
                    if c != 0x2E:  # "."
                        return E_VERSION
                    state = _S_VMINOR
                    pos += 1
                elif state in (_S_VEND, _S_VCR):
                    if c == _CR and state == _S_VEND:
                        state = _S_VCR
                        pos += 1
                        continue
                    if c != _LF:
                        return E_VERSION if state == _S_VEND else E_REQUEST_LINE_CR
                    if state == _S_VEND:  # a bare LF ends it (see "Decisions")
                        return E_BARE_LF
                    # The request line is complete.
                    vs = self._target_end + 1
                    if buf[vs + 5] != 0x31:  # major version "1"
                        if buf[self._method_start : vs + 8] == _H2_PREFACE_LINE:
                            return E_NOT_HTTP_H2
                        return E_VERSION_UNSUPPORTED
                    pos += 1
                    state = _S_HEADERS
                    self._headers_start = self._line_start = pos
            return NEED_MORE
        finally:
            self._pos = pos
            self._state = state
            self._steps = steps

    # -- completion: mirrors build() in ext/peek.pyx -------------------------

    def _complete(self, head_length: int) -> int:
        buf = self._buf
        ms, me, te = self._method_start, self._method_end, self._target_end
        method = buf[ms:me].decode("ascii")
        target = buf[me + 1 : te].decode("ascii")
        version = buf[te + 1 : te + 9].decode("ascii")
        minor = buf[te + 8] - 0x30

        headers: list[tuple[str, str]] = []
        hosts: list[bytes] = []
        cl: int | None = None
        cl_error = 0
        te_seen = False
        codings: list[bytes] = []
        conn_close = conn_keep_alive = expect_continue = False
        # The header lines were validated as they arrived: split them.
        block = bytes(buf[self._headers_start : head_length])
        for line in block.split(b"\n")[:-2]:
            if line[-1:] == b"\r":
                line = line[:-1]
            colon = line.index(b":")
            raw_value = line[colon + 1 :].strip(_OWS)
            name = line[:colon].decode("ascii").lower()
            value = raw_value.decode("latin-1")
            headers.append((name, value))
            if name == "host":
                hosts.append(raw_value)
            elif name == "content-length":
                if cl_error:
                    continue
                for el in raw_value.split(b","):
                    el = el.strip(_OWS)
                    if not el or len(el) > MAX_CL_DIGITS or not el.isdigit():
                        cl_error = E_CL_INVALID
                        break
                    if cl is None:
                        cl = int(el)
                    elif cl != int(el):
                        cl_error = E_CL_CONFLICT
                        break
            elif name == "transfer-encoding":
                te_seen = True
                # every list element counts, an empty one too (see
                # "Decisions": only exactly one chunked is accepted)
                codings += (el.strip(_OWS).lower() for el in raw_value.split(b","))
            elif name == "connection":
                for el in raw_value.split(b","):
                    token = el.strip(_OWS).lower()
                    if token == b"close":
                        conn_close = True
                    elif token == b"keep-alive":
                        conn_keep_alive = True
            elif name == "expect" and raw_value.lower() == b"100-continue":
                expect_continue = True

        # Cross-header rules, in this order (the compiled twin's order).
        if len(hosts) > 1:
            return E_HOST_MANY
        if not hosts and minor >= 1:
            return E_HOST_MISSING
        if hosts and not _HOST.fullmatch(hosts[0]):
            return E_HOST_INVALID
        host: str | None = hosts[0].decode("ascii") if hosts else None

        tb = bytes(buf[me + 1 : te])
        if method == "CONNECT":  # authority-form only (RFC 9112 §3.2.3)
            if not _HOST.fullmatch(tb):
                return E_TARGET
            host, path = target, ""
        elif tb[0] == 0x2F:  # "/": origin-form
            if has_dot_segment(tb):
                return E_DOT_SEGMENT
            path = target
        elif tb == b"*":  # asterisk-form, OPTIONS only (RFC 9112 §3.2.4)
            if method != "OPTIONS":
                return E_TARGET
            path = target
        else:  # absolute-form: scheme "://" authority [path-abempty] ["?" query]
            m = _SCHEME.match(tb)
            if m is None:
                return E_TARGET
            a = m.end()
            e = a
            while e < len(tb) and tb[e] != 0x2F and tb[e] != 0x3F:  # "/", "?"
                e += 1
            if e == a or not _HOST.fullmatch(tb, a, e):
                return E_TARGET
            host = target[a:e]
            path = target[e:]
            if not path.startswith("/"):
                path = "/" + path
            if has_dot_segment(tb, e):
                return E_DOT_SEGMENT
            if hosts and not same_authority(tb[: m.end() - 3], tb[a:e], hosts[0]):
                return E_HOST_CONFLICT

        if cl_error:
            return cl_error
        chunked = False
        if te_seen:
            if minor == 0:
                return E_TE_HTTP10
            # "chunked;x=1" is another coding (chunked has no parameters,
            # RFC 9112 §7.1), which a server may not take for chunked
            if codings != [b"chunked"]:
                return E_TE_NOT_CHUNKED
            if cl is not None:
                return E_CL_AND_TE
            chunked = True

        keep_alive = not conn_close and (minor >= 1 or conn_keep_alive)
        self._head = RequestHead(
            method,
            target,
            path,
            version,
            tuple(headers),
            host,
            head_length,
            keep_alive,
            cl,
            chunked,
            expect_continue and minor >= 1,  # RFC 9110 §10.1.1: ignore it in 1.0
        )
        return COMPLETE


def parse_head(data: bytes, max_head: int = DEFAULT_MAX_HEAD) -> RequestHead | None:
    """One-shot :meth:`HeadParser.feed`: the head in *data*, or None if incomplete."""
    return HeadParser(max_head).feed(data)

"""HTTP/1.1 message framing (RFC 9112 §6): where a body ends; the pure twin.

The per-request data plane forwards bytes verbatim, but it must know where
each message ends: to route the next request on a keep-alive connection, to
hand an upstream connection back to its pool, and to refuse what two parties
could frame differently (request smuggling). This module answers those
questions and nothing else. It is sans-IO: bytes in, counts and decisions
out; it never copies or keeps a body.

Theory of operation
-------------------
1. *Which framing.* :func:`request_framing` (from a parsed
   :class:`~l4proxy.dataplane._peek_py.RequestHead`) and :func:`response_framing` (from
   a :class:`ResponseHead` and the request it answers) pick one
   :class:`Framing`: no body, a fixed length, chunked, until the server
   closes (responses only), or a tunnel (a 2xx answer to CONNECT, a 101 to a
   request that asked to Upgrade). The order of the checks is RFC 9112 §6.3's.
2. *Where it ends.* A :class:`BodyFramer` is fed the bytes that follow the
   head and returns how many of them belong to the body; once ``done``, the
   rest is the next message. Inside a length-delimited body or inside chunk
   data, :meth:`BodyFramer.blind` says how many bytes may pass without being
   looked at (the relay may splice them) and :meth:`BodyFramer.skip` accounts
   for them: a 1 GiB body costs O(1) calls here, never a scan.
3. *Chunked* is a byte-wise state machine over the chunk-size lines, the
   CRLF after each chunk's data, and the trailer section; the chunk data
   itself is skipped by count.

Decisions (where RFC 9112 leaves room, we take the strict side; any
disagreement between us and the next hop about where a message ends is a
smuggling vector, and we forward bodies unmodified, so we cannot normalise
them)
------------------------------------------------------------------------
* Every line of the chunked framing ends in CRLF: a bare LF or a bare CR is
  an error (lenient parsers differ here; "funky chunks" smuggling). HAProxy
  and nginx take a bare LF there, but they decode the chunks and encode
  them again for the client; we pass the body's bytes on as they came
  (spliced, mostly), and a client that ends lines only at CRLF would frame
  the body otherwise.
* A chunk size is 1*HEXDIG whose value fits 63 bits (leading zeros are
  allowed: they are valid and do not overflow); nothing else may precede the
  extension or the CRLF, except BWS before ";" (§7.1.1).
* A chunk extension is bounded (:data:`MAX_CHUNK_LINE` bytes for the whole
  size line) and may hold no control byte other than HTAB.
* Trailer lines are checked like header lines (no obs-fold, no whitespace
  before the colon) and their section is bounded like a head.
* A response with both Content-Length and Transfer-Encoding is refused
  (502): §6.3 lets Transfer-Encoding win, but the bytes would then reach the
  client with both headers, which is the very ambiguity we refuse in
  requests. A response whose Transfer-Encoding does not name chunked is
  close-delimited (§6.3 item 4); one that names it other than once and
  last (``chunked, chunked`` on one line or two, ``chunked, gzip``,
  ``chunked;x``, ``chunked`` with obs-text beside it) is refused (502, as
  HAProxy refuses it): a client that reads it as chunked (nginx does, and
  §6.3 item 3 for chunked twice) would end the body where we read on to
  the close, and take what the server sends after it for the next
  response. Empty list elements are no coding (``chunked,`` is chunked,
  RFC 9110 §5.6.1).
* A response Content-Length that is not one valid number (or a list of equal
  ones) is refused (502, §6.3 item 5).
* A 101 to a request that did not ask to Upgrade, or any response to a
  request whose framing we refused, is an error of the server: 502.
* A 1xx head with a Transfer-Encoding, or a Content-Length other than 0,
  is refused (502), as Envoy refuses it: a server MUST NOT send them (RFC
  9110 §8.6, RFC 9112 §6.1) and a 1xx has no body whatever they say, but
  the head goes to the client as it came, and a client that reads them
  would take the final answer's head for the 1xx's body and what follows
  for the answer. HAProxy drops the two fields; we never rewrite a head's
  lines. ``Content-Length: 0`` frames nothing either way: it goes on.
* A 204's Content-Length and Transfer-Encoding lines, and a 304's
  Transfer-Encoding lines, are dropped from the head the client gets
  (:func:`bodiless_head`); neither has a body whatever they say (§6.3
  item 1), the framing stays none. A server MUST NOT send either in a 204
  (RFC 9110 §8.6, RFC 9112 §6.1); §6.1 lets one send Transfer-Encoding in
  a 304, but a client that reads ``chunked`` before the status (Python's
  http.client, so urllib and requests) waits for a chunk that never comes,
  or reads the next answer as one. nginx sends neither (its 204 loses its
  Content-Length; it never passes an upstream's Transfer-Encoding on);
  Envoy refuses a 204's Transfer-Encoding or non-zero Content-Length (an
  upstream protocol error) and drops its ``Content-Length: 0``: we drop them
  and answer. A 304's Content-Length (the selected representation's size,
  §8.6) and a HEAD answer's fields (what a GET would have said) go on:
  clients read no body after either.
* A bare LF (an LF without the CR before it) ending a line of a response
  head (the status line, a header line, the empty line that ends it) ends
  the line, as §2.2 lets a recipient take it and as Envoy (its codecs,
  http-parser and Balsa), HAProxy and nginx take it from legacy servers;
  :attr:`ResponseHead.bare_lf` says so, and the relays send such a head on
  with every line ending in CRLF (:func:`crlf_head`), as those proxies
  write it out again: a client that ends lines only at CRLF would read
  ``X: y\nSet-Cookie: a`` as one field, and a head ending in ``\n\n`` as
  going on into the body, other headers than the ones we judged (response
  splitting). A bare CR (not before an LF) is refused (502), as in a
  request head, where a bare LF is refused too (400: a request head goes
  upstream as it came, see _peek_py's "Decisions"; llhttp, strict, refuses
  one either way).
"""

from __future__ import annotations

import enum
import re
from typing import Final, NamedTuple

from l4proxy.dataplane._peek_py import (
    DEFAULT_MAX_HEAD,
    MAX_CL_DIGITS,
    RequestHead,
    _header_line_error,
)

__all__ = [
    "BodyFramer",
    "Framing",
    "FramingError",
    "ResponseHead",
    "bodiless_head",
    "crlf_head",
    "head_may_end",
    "parse_response_head",
    "request_framing",
    "response_framing",
]

MAX_CHUNK_LINE: Final = 4096  # a chunk-size line, extensions included
MAX_CHUNK_SIZE: Final = (1 << 63) - 1  # fits int64 in the compiled twin


class FramingError(Exception):
    """The message cannot be framed unambiguously: answer ``status``, close.

    ``status`` is 400 for a client's message and 502 for a server's.
    ``used``: from :meth:`BodyFramer.feed`, how many leading bytes of the
    data fed were framed before the byte that is refused (0 otherwise).
    """

    def __init__(self, status: int, reason: str, used: int = 0) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.used = used

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class Framing(enum.IntEnum):
    """How the end of a message body is found (RFC 9112 §6.3)."""

    NONE = 0  # no body: the message ends with its head
    LENGTH = 1  # Content-Length bytes
    CHUNKED = 2  # the chunked coding, trailers included
    CLOSE = 3  # until the sender closes (responses only)
    TUNNEL = 4  # not HTTP any more: relay both ways until both close


class ResponseHead(NamedTuple):
    """A parsed response head; ``head_length`` counts every byte of it;
    ``bare_lf``: a line of it ended in a bare LF (it goes on as
    :func:`crlf_head` writes it, see "Decisions")."""

    version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    head_length: int
    bare_lf: bool = False

    def header(self, name: str) -> str | None:
        key = name.lower()
        for k, v in self.headers:
            if k == key:
                return v
        return None

    def values(self, name: str) -> list[str]:
        """Every comma-separated element of every *name* header, in order,
        without the OWS around it: SP and HTAB only (str.strip() would also
        take NBSP and NEL, obs-text that the compiled twin and the next hop
        keep: "close\xa0" is not "close", nor "\xa05" a Content-Length)."""
        key = name.lower()
        out: list[str] = []
        for k, v in self.headers:
            if k == key:
                out.extend(e.strip(" \t") for e in v.split(","))
        return out


_STATUS_LINE: Final = re.compile(
    rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\Z"
)
_HEADER: Final = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[\t ]*([\t\x20-\x7e\x80-\xff]*?)[\t ]*\Z"
)


def parse_response_head(
    data: bytes | bytearray | memoryview, max_head: int = DEFAULT_MAX_HEAD
) -> ResponseHead | None:
    """The response head at the start of *data*, or None if incomplete.

    Raises :class:`FramingError` (502) for a malformed head or one larger
    than *max_head*. The head ends at its first empty line; each of its
    lines ends in CRLF or a bare LF (``bare_lf`` then: see "Decisions"); a
    CR anywhere else is refused.
    """
    buf = bytes(data[:max_head]) if len(data) > max_head else bytes(data)
    if b"\n\r\n" not in buf and b"\n\n" not in buf:  # no end of head yet
        if len(data) > max_head:
            raise FramingError(502, f"response head larger than {max_head} bytes")
        return None
    lines: list[bytes] = []
    pos = 0
    bare_lf = False
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(data) > max_head:
                raise FramingError(502, f"response head larger than {max_head} bytes")
            return None
        line = buf[pos:nl]
        if line.endswith(b"\r"):
            line = line[:-1]
        else:
            bare_lf = True
        if b"\r" in line:
            raise FramingError(502, "CR without LF in the response head")
        pos = nl + 1
        if not line:
            if not lines:
                raise FramingError(502, "empty response status line")
            break
        lines.append(line)
    m = _STATUS_LINE.match(lines[0])
    if m is None:
        raise FramingError(502, "malformed response status line")
    if m.group(1) != b"1":
        raise FramingError(502, "response HTTP version is not 1.x")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        h = _HEADER.match(line)
        if h is None:
            code = _header_line_error(line, 0, len(line))
            raise FramingError(502, f"malformed response header line (code {code})")
        headers.append((h.group(1).decode("ascii").lower(), h.group(2).decode("latin-1")))
    return ResponseHead(
        version=f"HTTP/1.{m.group(2).decode()}",
        status=int(m.group(3)),
        reason=(m.group(4) or b"").decode("latin-1"),
        headers=tuple(headers),
        head_length=pos,
        bare_lf=bare_lf,
    )


def head_may_end(
    buf: bytes | bytearray, old: int, clean: int, max_head: int
) -> tuple[bool, int, int]:
    """A response head read in pieces: whether *buf* (its bytes so far,
    *old* of them before this read) is to be parsed now; with the new
    *clean* (``buf[:clean]`` holds no end of a head: where the next look
    starts; 0 once it is to be parsed) and the bytes this looked at, the
    parse included (the rescan counters: response_head_rescan_bytes,
    mirror_head_rescan_bytes). The first read is parsed at once. Later ones
    only once a head's end may be there (an empty line's LF, LF or LF, CR,
    LF: :func:`parse_response_head` says None without one), looked for from
    where the last look stopped (less two bytes: one that straddles it is
    found), or once past *max_head* (the parser refuses it); not from its
    start at each read (quadratic in its size). The compiled twin's
    head_end_in(), in ext/relay.pyx."""
    if not old:
        return True, 0, 0
    looked = 0
    if clean <= old and len(buf) <= max_head:
        start = clean - 2 if clean > 2 else 0
        looked = len(buf) - start
        if buf.find(b"\n\n", start) < 0 and buf.find(b"\n\r\n", start) < 0:
            return False, len(buf), looked
    return True, 0, looked + len(buf)


def crlf_head(raw: bytes) -> bytes:
    """*raw*, a response head :func:`parse_response_head` took, with every
    line ending in CRLF (those ending in a bare LF get their CR: the head
    as sent on where ``bare_lf``, see "Decisions"). The parser refused any
    CR not before an LF, so none is left alone."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def bodiless_head(raw: bytes, status: int) -> bytes:
    """*raw*, a final response head with CRLF line ends (:func:`crlf_head`
    of one with a bare LF), as the client gets it when *status* has no
    body: a 204 without its Content-Length and Transfer-Encoding lines, a
    304 without its Transfer-Encoding lines (see "Decisions"); any other
    as it is (itself, when nothing goes)."""
    if status == 204:
        drop: tuple[bytes, ...] = (b"content-length", b"transfer-encoding")
    elif status == 304:
        drop = (b"transfer-encoding",)
    else:
        return raw
    lines = raw.split(b"\r\n")
    kept = [lines[0]] + [line for line in lines[1:] if line.partition(b":")[0].lower() not in drop]
    return raw if len(kept) == len(lines) else b"\r\n".join(kept)


def request_framing(head: RequestHead) -> tuple[Framing, int]:
    """The framing of the body that follows *head*, and its length if LENGTH.

    The request-head parser has already refused every ambiguous combination
    (CL with TE, differing CLs, TE not ending in chunked, TE in HTTP/1.0).
    CONNECT has no body; it becomes a tunnel only on a 2xx answer.
    """
    if head.chunked:
        return Framing.CHUNKED, 0
    if head.content_length:
        return Framing.LENGTH, head.content_length
    return Framing.NONE, 0


def _response_content_length(values: list[str]) -> int:
    if not values or any(
        not v.isdigit() or not v.isascii() or len(v) > MAX_CL_DIGITS for v in values
    ):
        raise FramingError(502, "invalid Content-Length in the response")
    if len(set(int(v) for v in values)) != 1:
        raise FramingError(502, "conflicting Content-Length values in the response")
    return int(values[0])


def response_framing(request: RequestHead, response: ResponseHead) -> tuple[Framing, int]:
    """The framing of the body after *response*, sent for *request* (§6.3)."""
    status = response.status
    if 100 <= status < 200:
        # a 1xx has no body whatever its fields say (§6.3), and a server
        # MUST NOT send it either field (RFC 9110 §8.6, RFC 9112 §6.1): a
        # client that reads one would take the final answer for its body
        # (see "Decisions"); a Content-Length of 0 frames nothing
        if any(k == "transfer-encoding" for k, _ in response.headers):
            raise FramingError(502, "Transfer-Encoding in a 1xx response")
        cl = response.values("content-length")
        if cl and _response_content_length(cl):
            raise FramingError(502, "Content-Length in a 1xx response")
        if status == 101:
            if request.header("upgrade") is None:
                raise FramingError(502, "101 Switching Protocols without an Upgrade request")
            return Framing.TUNNEL, 0
        return Framing.NONE, 0  # interim: the final response head follows
    if request.method == "CONNECT" and 200 <= status < 300:
        return Framing.TUNNEL, 0
    te = response.values("transfer-encoding")
    cl = response.values("content-length")
    if te and cl:
        raise FramingError(502, "both Content-Length and Transfer-Encoding in the response")
    if request.method == "HEAD" or status in (204, 304):
        if cl:  # still has to be well-formed: it is forwarded
            _response_content_length(cl)
        return Framing.NONE, 0
    if te:
        if response.version == "HTTP/1.0":
            raise FramingError(502, "Transfer-Encoding in an HTTP/1.0 response")
        # empty list elements are no coding (RFC 9110 §5.6.1: "chunked,"
        # is chunked, as the client, HAProxy and nginx read it)
        codings = [c.lower() for c in te if c]
        if codings.count("chunked") == 1 and codings[-1] == "chunked":
            return Framing.CHUNKED, 0
        if any("chunked" in c for c in codings):
            # chunked twice, not last, or not a coding of its own ("chunked;x",
            # "chunked\xa0"): a client may read chunked where we read to the
            # close, and what follows its end as the next response
            raise FramingError(502, "chunked not once and last in the response's Transfer-Encoding")
        return Framing.CLOSE, 0
    if cl:
        n = _response_content_length(cl)
        return (Framing.LENGTH, n) if n else (Framing.NONE, 0)
    return Framing.CLOSE, 0


# Chunked states; the compiled twin uses the same values.
_C_SIZE0: Final = 0  # first hex digit of a chunk size
_C_SIZE: Final = 1  # more hex digits, BWS, ";" or CR
_C_BWS: Final = 2  # whitespace after the size: only ";" may follow
_C_EXT: Final = 3  # inside chunk extensions, until CR
_C_SIZE_LF: Final = 4  # CR seen, need LF
_C_DATA: Final = 5  # chunk data: skipped by count
_C_DATA_CR: Final = 6  # after the data: need CR
_C_DATA_LF: Final = 7  # ... then LF
_C_TRAILER: Final = 8  # start of a trailer line, or CR of the final CRLF
_C_TNAME: Final = 9  # inside a trailer field name, until ":"
_C_TVALUE: Final = 10  # inside a trailer field value, until CR
_C_TLF: Final = 11  # CR of a trailer line seen, need LF
_C_END_LF: Final = 12  # CR of the final empty line seen, need LF
_C_DONE: Final = 13
_C_ERROR: Final = 14

# Error codes and reasons, shared with the compiled twin (same numbers).
E_CHUNK_LINE_LONG: Final = 1
E_CHUNK_LINE_LF: Final = 2
E_CHUNK_SIZE_OVERFLOW: Final = 3
E_CHUNK_SIZE_NOT_HEX: Final = 4
E_CHUNK_SIZE_BYTE: Final = 5
E_CHUNK_EXT_CONTROL: Final = 6
E_CHUNK_SIZE_CR: Final = 7
E_CHUNK_DATA_CRLF: Final = 8
E_TRAILERS_LARGE: Final = 9
E_TRAILER_LF: Final = 10
E_TRAILER_CR: Final = 11
E_TRAILER_NO_COLON: Final = 12
E_TRAILER_MALFORMED: Final = 13
E_TRAILERS_END_CR: Final = 14

CHUNKED_ERRORS: Final[dict[int, str]] = {
    E_CHUNK_LINE_LONG: f"chunk-size line longer than {MAX_CHUNK_LINE} bytes",
    E_CHUNK_LINE_LF: "bare LF in a chunk-size line",
    E_CHUNK_SIZE_OVERFLOW: "chunk size overflows",
    E_CHUNK_SIZE_NOT_HEX: "chunk size is not hexadecimal",
    E_CHUNK_SIZE_BYTE: "invalid byte after the chunk size",
    E_CHUNK_EXT_CONTROL: "control byte in a chunk extension",
    E_CHUNK_SIZE_CR: "CR without LF after the chunk size",
    E_CHUNK_DATA_CRLF: "chunk data not followed by CRLF",
    E_TRAILERS_LARGE: "trailer section larger than {max_trailers} bytes",
    E_TRAILER_LF: "bare LF in the trailer section",
    E_TRAILER_CR: "CR without LF in the trailer section",
    E_TRAILER_NO_COLON: "trailer line without a colon",
    E_TRAILER_MALFORMED: "trailer line malformed",
    E_TRAILERS_END_CR: "CR without LF at the end of the trailers",
}


def chunked_error(code: int, status: int, max_trailers: int, used: int = 0) -> FramingError:
    """The exception for chunked error *code* (shared by both twins); *used*:
    the bytes of the data fed before the refused one."""
    return FramingError(status, CHUNKED_ERRORS[code].format(max_trailers=max_trailers), used)


_HEX: Final = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_TCHAR: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_CR: Final = 0x0D
_LF: Final = 0x0A
_SP: Final = 0x20
_HTAB: Final = 0x09
_COLON: Final = 0x3A
_SEMI: Final = 0x3B


def _field_value_byte(c: int) -> bool:
    """HTAB, SP, VCHAR or obs-text (RFC 9110 §5.5)."""
    return c == _HTAB or (_SP <= c <= 0x7E) or c >= 0x80


class BodyFramer:
    """Finds the end of one message body (sans-IO, never copies the body).

    ``feed(data)`` returns how many leading bytes of *data* belong to the
    body; ``done`` turns True when the body ended inside them (the bytes after
    belong to the next message). ``blind()`` is how many of the next bytes
    may pass unseen; ``skip(n)`` accounts for *n* <= ``blind()`` such bytes.
    A CLOSE or TUNNEL body never ends here: the caller sees EOF.
    Errors raise :class:`FramingError` with *error_status* (400 or 502),
    and again on every later call. Its ``used`` counts the leading bytes of
    *data* framed before the refused byte (0 on a later call): the caller
    forwards them before it gives up, as it would have had the refused byte
    come in a read of its own, so that what is forwarded does not depend on
    how the bytes were split.
    """

    __slots__ = (
        "_error",
        "_line",
        "_remaining",
        "_size",
        "_state",
        "_trailer_bytes",
        "error_status",
        "framing",
        "max_trailers",
    )

    def __init__(
        self,
        framing: Framing,
        length: int = 0,
        error_status: int = 400,
        max_trailers: int = DEFAULT_MAX_HEAD,
    ) -> None:
        if framing == Framing.LENGTH and length < 0:
            raise ValueError(f"negative length {length}")
        self.framing = Framing(framing)
        self.error_status = error_status
        self.max_trailers = max_trailers
        self._remaining = length if framing == Framing.LENGTH else 0
        self._state = _C_SIZE0
        self._size = 0
        self._line = 0  # bytes of the current chunk-size line
        self._trailer_bytes = 0
        self._error = 0

    @property
    def done(self) -> bool:
        if self.framing == Framing.NONE:
            return True
        if self.framing == Framing.LENGTH:
            return self._remaining == 0
        if self.framing == Framing.CHUNKED:
            return self._state == _C_DONE
        return False

    def blind(self) -> int:
        """Bytes that may be forwarded without being fed (spliced)."""
        if self.framing == Framing.LENGTH:
            return self._remaining
        if self.framing == Framing.CHUNKED and self._state == _C_DATA:
            return self._remaining
        if self.framing in (Framing.CLOSE, Framing.TUNNEL):
            return MAX_CHUNK_SIZE
        return 0

    def skip(self, n: int) -> None:
        """Account for *n* bytes forwarded unseen (at most ``blind()``)."""
        if n < 0 or n > self.blind():
            raise ValueError(f"skip({n}) beyond blind() = {self.blind()}")
        if self.framing == Framing.LENGTH or (
            self.framing == Framing.CHUNKED and self._state == _C_DATA
        ):
            self._remaining -= n
            if self.framing == Framing.CHUNKED and self._remaining == 0:
                self._state = _C_DATA_CR

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """How many leading bytes of *data* are this body's."""
        n = len(data)
        if self.framing == Framing.NONE:
            return 0
        if self.framing == Framing.LENGTH:
            take = n if n < self._remaining else self._remaining
            self._remaining -= take
            return take
        if self.framing != Framing.CHUNKED:
            return n
        if self._state != _C_ERROR:
            i = self._chunked(data, n)
            if self._state != _C_ERROR:
                return i
            raise chunked_error(self._error, self.error_status, self.max_trailers, i)
        raise chunked_error(self._error, self.error_status, self.max_trailers)

    # -- the chunked machine: mirrors chunked() in ext/framing.pyx ----------

    def _chunked(self, data: bytes | bytearray | memoryview, n: int) -> int:
        """Run the machine over *data*; the bytes consumed (error: _C_ERROR,
        and the bytes before the refused one)."""
        i = 0
        state = self._state
        err = 0
        while i < n and state != _C_DONE:
            if state == _C_DATA:
                take = n - i if n - i < self._remaining else self._remaining
                self._remaining -= take
                i += take
                if self._remaining == 0:
                    state = _C_DATA_CR
                continue
            c = data[i]
            i += 1
            if state <= _C_SIZE_LF:
                self._line += 1
                if self._line > MAX_CHUNK_LINE:
                    err = E_CHUNK_LINE_LONG
                elif c == _LF and state != _C_SIZE_LF:
                    err = E_CHUNK_LINE_LF
                elif state <= _C_SIZE:
                    d = _HEX.get(c, -1)
                    if d >= 0:
                        self._size = self._size * 16 + d
                        if self._size > MAX_CHUNK_SIZE:
                            err = E_CHUNK_SIZE_OVERFLOW
                        state = _C_SIZE
                    elif state == _C_SIZE0:
                        err = E_CHUNK_SIZE_NOT_HEX
                    elif c == _CR:
                        state = _C_SIZE_LF
                    elif c == _SEMI:
                        state = _C_EXT
                    elif c in (_SP, _HTAB):
                        state = _C_BWS
                    else:
                        err = E_CHUNK_SIZE_BYTE
                elif state == _C_BWS:
                    if c == _SEMI:
                        state = _C_EXT
                    elif c not in (_SP, _HTAB):
                        err = E_CHUNK_SIZE_BYTE
                elif state == _C_EXT:
                    if c == _CR:
                        state = _C_SIZE_LF
                    elif not _field_value_byte(c):
                        err = E_CHUNK_EXT_CONTROL
                elif c != _LF:  # _C_SIZE_LF
                    err = E_CHUNK_SIZE_CR
                else:
                    self._line = 0
                    if self._size == 0:
                        state = _C_TRAILER
                    else:
                        self._remaining = self._size
                        self._size = 0
                        state = _C_DATA
            elif state == _C_DATA_CR:
                if c != _CR:
                    err = E_CHUNK_DATA_CRLF
                state = _C_DATA_LF
            elif state == _C_DATA_LF:
                if c != _LF:
                    err = E_CHUNK_DATA_CRLF
                state = _C_SIZE0
            else:
                self._trailer_bytes += 1
                if self._trailer_bytes > self.max_trailers:
                    err = E_TRAILERS_LARGE
                elif state == _C_TRAILER:
                    if c == _CR:
                        state = _C_END_LF
                    elif c == _LF:
                        err = E_TRAILER_LF
                    elif c in _TCHAR:
                        state = _C_TNAME
                    else:  # obs-fold, an empty name, a bad byte
                        err = E_TRAILER_MALFORMED
                elif state == _C_TNAME:
                    if c == _COLON:
                        state = _C_TVALUE
                    elif c == _CR:
                        err = E_TRAILER_NO_COLON
                    elif c == _LF:
                        err = E_TRAILER_LF
                    elif c not in _TCHAR:
                        err = E_TRAILER_MALFORMED
                elif state == _C_TVALUE:
                    if c == _CR:
                        state = _C_TLF
                    elif c == _LF:
                        err = E_TRAILER_LF
                    elif not _field_value_byte(c):
                        err = E_TRAILER_MALFORMED
                elif state == _C_TLF:
                    if c != _LF:
                        err = E_TRAILER_CR
                    state = _C_TRAILER
                else:  # _C_END_LF
                    if c != _LF:
                        err = E_TRAILERS_END_CR
                    state = _C_DONE
            if err:
                self._error = err
                self._state = _C_ERROR
                return i - 1
        self._state = state
        return i

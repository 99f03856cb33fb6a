# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""HTTP/1.1 message framing: the compiled twin of l4proxy/dataplane/_framing_py.py.

Read the theory of operation and the decisions in ``l4proxy/dataplane/_framing_py.py``.
This file implements the per-byte part, the chunked machine, as a C function
over a C struct (``chunked()``, no GIL, no Python object touched), so that
the compiled relay can call it on its own buffers; ``BodyFramer`` wraps it
with the pure twin's interface. It follows the pure twin's ``_chunked`` line
for line; ``tests/test_framing.py`` runs every case on both twins and fuzzes
them against each other.

Shared with the pure twin, imported from it: :class:`FramingError`,
:class:`Framing`, the error table (``chunked_error``) and the once-per-head
decisions (``parse_response_head``, ``request_framing``, ``response_framing``).
Only the state and error numbers are repeated below, as C enums; they must
keep the values of the constants in ``_framing_py.py``.

Buffers: ``feed`` reads the caller's buffer in place and releases it before
returning; nothing keeps a pointer into a caller's object.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t

from l4proxy.dataplane._framing_py import (
    DEFAULT_MAX_HEAD,
    MAX_CHUNK_LINE,
    MAX_CHUNK_SIZE,
    Framing,
    FramingError,
    ResponseHead,
    chunked_error,
    parse_response_head,
    request_framing,
    response_framing,
)

__all__ = [
    "BodyFramer",
    "Framing",
    "FramingError",
    "ResponseHead",
    "parse_response_head",
    "request_framing",
    "response_framing",
]

# Framing kinds: the values of Framing in _framing_py.py.
cdef enum:
    F_NONE = 0
    F_LENGTH = 1
    F_CHUNKED = 2
    F_CLOSE = 3
    F_TUNNEL = 4

# Chunked states: the values of _C_* in _framing_py.py.
cdef enum:
    C_SIZE0 = 0
    C_SIZE = 1
    C_BWS = 2
    C_EXT = 3
    C_SIZE_LF = 4
    C_DATA = 5
    C_DATA_CR = 6
    C_DATA_LF = 7
    C_TRAILER = 8
    C_TNAME = 9
    C_TVALUE = 10
    C_TLF = 11
    C_END_LF = 12
    C_DONE = 13
    C_ERROR = 14

# Error codes: the values of E_* in _framing_py.py.
cdef enum:
    E_CHUNK_LINE_LONG = 1
    E_CHUNK_LINE_LF = 2
    E_CHUNK_SIZE_OVERFLOW = 3
    E_CHUNK_SIZE_NOT_HEX = 4
    E_CHUNK_SIZE_BYTE = 5
    E_CHUNK_EXT_CONTROL = 6
    E_CHUNK_SIZE_CR = 7
    E_CHUNK_DATA_CRLF = 8
    E_TRAILERS_LARGE = 9
    E_TRAILER_LF = 10
    E_TRAILER_CR = 11
    E_TRAILER_NO_COLON = 12
    E_TRAILER_MALFORMED = 13
    E_TRAILERS_END_CR = 14

cdef enum:
    CR = 0x0D
    LF = 0x0A
    SP = 0x20
    HTAB = 0x09
    COLON = 0x3A
    SEMI = 0x3B

cdef int64_t C_MAX_CHUNK_SIZE = MAX_CHUNK_SIZE
cdef int C_MAX_CHUNK_LINE = MAX_CHUNK_LINE

# Byte classes, filled once at import.
cdef signed char HEX[256]
cdef bint TCHAR[256]


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        HEX[c] = -1
        TCHAR[c] = 0
    for c in range(10):
        HEX[0x30 + c] = c
    for c in range(6):
        HEX[0x41 + c] = 10 + c
        HEX[0x61 + c] = 10 + c
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        TCHAR[c] = 1


_init_tables()


cdef struct Chunked:
    int state
    int error
    int line            # bytes of the current chunk-size line
    int64_t size        # the chunk size being read
    int64_t remaining   # chunk data still to come
    int64_t trailer_bytes
    int64_t max_trailers


cdef inline bint field_value_byte(unsigned char c) noexcept nogil:
    return c == HTAB or (c >= SP and c <= 0x7E) or c >= 0x80


cdef Py_ssize_t chunked(Chunked* k, const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """Run the machine over data[0:n]; the bytes consumed (error: C_ERROR)."""
    cdef Py_ssize_t i = 0
    cdef int state = k.state
    cdef int err = 0
    cdef int d
    cdef int64_t take
    cdef unsigned char c
    while i < n and state != C_DONE:
        if state == C_DATA:
            take = n - i if n - i < k.remaining else k.remaining
            k.remaining -= take
            i += take
            if k.remaining == 0:
                state = C_DATA_CR
            continue
        c = data[i]
        i += 1
        if state <= C_SIZE_LF:
            k.line += 1
            if k.line > C_MAX_CHUNK_LINE:
                err = E_CHUNK_LINE_LONG
            elif c == LF and state != C_SIZE_LF:
                err = E_CHUNK_LINE_LF
            elif state <= C_SIZE:
                d = HEX[c]
                if d >= 0:
                    # Checked before the multiplication: a signed overflow is
                    # undefined in C (the pure twin checks after; same result).
                    if k.size > (C_MAX_CHUNK_SIZE - d) // 16:
                        err = E_CHUNK_SIZE_OVERFLOW
                    else:
                        k.size = k.size * 16 + d
                    state = C_SIZE
                elif state == C_SIZE0:
                    err = E_CHUNK_SIZE_NOT_HEX
                elif c == CR:
                    state = C_SIZE_LF
                elif c == SEMI:
                    state = C_EXT
                elif c == SP or c == HTAB:
                    state = C_BWS
                else:
                    err = E_CHUNK_SIZE_BYTE
            elif state == C_BWS:
                if c == SEMI:
                    state = C_EXT
                elif c != SP and c != HTAB:
                    err = E_CHUNK_SIZE_BYTE
            elif state == C_EXT:
                if c == CR:
                    state = C_SIZE_LF
                elif not field_value_byte(c):
                    err = E_CHUNK_EXT_CONTROL
            elif c != LF:  # C_SIZE_LF
                err = E_CHUNK_SIZE_CR
            else:
                k.line = 0
                if k.size == 0:
                    state = C_TRAILER
                else:
                    k.remaining = k.size
                    k.size = 0
                    state = C_DATA
        elif state == C_DATA_CR:
            if c != CR:
                err = E_CHUNK_DATA_CRLF
            state = C_DATA_LF
        elif state == C_DATA_LF:
            if c != LF:
                err = E_CHUNK_DATA_CRLF
            state = C_SIZE0
        else:
            k.trailer_bytes += 1
            if k.trailer_bytes > k.max_trailers:
                err = E_TRAILERS_LARGE
            elif state == C_TRAILER:
                if c == CR:
                    state = C_END_LF
                elif c == LF:
                    err = E_TRAILER_LF
                elif TCHAR[c]:
                    state = C_TNAME
                else:
                    err = E_TRAILER_MALFORMED
            elif state == C_TNAME:
                if c == COLON:
                    state = C_TVALUE
                elif c == CR:
                    err = E_TRAILER_NO_COLON
                elif c == LF:
                    err = E_TRAILER_LF
                elif not TCHAR[c]:
                    err = E_TRAILER_MALFORMED
            elif state == C_TVALUE:
                if c == CR:
                    state = C_TLF
                elif c == LF:
                    err = E_TRAILER_LF
                elif not field_value_byte(c):
                    err = E_TRAILER_MALFORMED
            elif state == C_TLF:
                if c != LF:
                    err = E_TRAILER_CR
                state = C_TRAILER
            else:  # C_END_LF
                if c != LF:
                    err = E_TRAILERS_END_CR
                state = C_DONE
        if err:
            k.error = err
            state = C_ERROR
            break
    k.state = state
    return i


cdef class BodyFramer:
    """Finds the end of one message body; see the pure twin's docstring."""

    cdef Chunked _k
    cdef int _framing
    cdef int64_t _length_left
    cdef readonly int error_status
    cdef readonly int64_t max_trailers

    def __init__(self, framing, length=0, error_status=400, max_trailers=DEFAULT_MAX_HEAD):
        if framing == F_LENGTH and length < 0:
            raise ValueError(f"negative length {length}")
        self._framing = int(Framing(framing))
        self.error_status = error_status
        self.max_trailers = max_trailers
        self._length_left = length if framing == F_LENGTH else 0
        self._k.state = C_SIZE0
        self._k.error = 0
        self._k.line = 0
        self._k.size = 0
        self._k.remaining = 0
        self._k.trailer_bytes = 0
        self._k.max_trailers = max_trailers

    @property
    def framing(self):
        return Framing(self._framing)

    @property
    def done(self):
        if self._framing == F_NONE:
            return True
        if self._framing == F_LENGTH:
            return self._length_left == 0
        if self._framing == F_CHUNKED:
            return self._k.state == C_DONE
        return False

    def blind(self):
        if self._framing == F_LENGTH:
            return self._length_left
        if self._framing == F_CHUNKED and self._k.state == C_DATA:
            return self._k.remaining
        if self._framing == F_CLOSE or self._framing == F_TUNNEL:
            return C_MAX_CHUNK_SIZE
        return 0

    def skip(self, n):
        cdef int64_t blind = self.blind()
        if n < 0 or n > blind:
            raise ValueError(f"skip({n}) beyond blind() = {blind}")
        if self._framing == F_LENGTH:
            self._length_left -= n
        elif self._framing == F_CHUNKED and self._k.state == C_DATA:
            self._k.remaining -= n
            if self._k.remaining == 0:
                self._k.state = C_DATA_CR

    def feed(self, data):
        cdef Py_buffer view
        cdef Py_ssize_t n, i
        cdef int64_t take
        if self._framing == F_NONE:
            return 0
        if self._framing != F_CHUNKED:
            n = len(data)
            if self._framing == F_LENGTH:
                take = n if n < self._length_left else self._length_left
                self._length_left -= take
                return take
            return n
        if self._k.state != C_ERROR:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                with nogil:
                    i = chunked(&self._k, <const unsigned char*>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
            if self._k.state != C_ERROR:
                return i
        raise chunked_error(self._k.error, self.error_status, self.max_trailers)

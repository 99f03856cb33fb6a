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

include "_bytes.pxi"
include "_chunked.pxi"


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
            raise chunked_error(self._k.error, self.error_status, self.max_trailers, i)
        raise chunked_error(self._k.error, self.error_status, self.max_trailers)

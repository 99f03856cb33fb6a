# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Peek at an HTTP/1.x request head: the compiled twin of l4proxy/dataplane/_peek_py.py.

Read the theory of operation and the decisions in ``l4proxy/dataplane/_peek_py.py``;
this file implements the same state machine with C loops over the byte
buffer, line for line in the same order, so the two twins answer every input
identically (``tests/test_peek.py`` checks it, also with hypothesis). Python
objects are created only for the result (``build``) and for errors.

Shared with the pure twin, imported from it: the exception classes, the
:class:`RequestHead` type and the error table (``make_error``). Only the
error *codes* and state numbers are repeated below, as C enums; they must
keep the values of the constants in ``_peek_py.py``.

Buffers: ``HeadParser`` owns a PyMem buffer holding every byte fed so far
(``buffered`` copies it out). ``parse_head`` scans the caller's buffer in
place, without copying, and releases it before returning; nothing keeps a
pointer into a caller's object after the call.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

from l4proxy.dataplane._peek_py import HeadError, NotHTTP, RequestHead, make_error

__all__ = ["HeadError", "HeadParser", "NotHTTP", "RequestHead", "parse_head"]


cdef extern from "Python.h":
    ctypedef unsigned char Py_UCS1
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    Py_UCS1* PyUnicode_1BYTE_DATA(object o)
    object PyUnicode_DecodeLatin1(const char* s, Py_ssize_t size, const char* errors)


include "_bytes.pxi"
include "_head_scan.pxi"


cdef inline str latin1(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b):
    return PyUnicode_DecodeLatin1(<const char*>buf + a, b - a, NULL)


cdef Py_ssize_t bare_end(
    const unsigned char* buf, Py_ssize_t a, Py_ssize_t e, const char* port, Py_ssize_t n
) noexcept nogil:
    """The end of buf[a:e] without its default port *port* (n bytes, ":80"),
    when it ends so."""
    if n and e - a >= n and memcmp(buf + e - n, port, n) == 0:
        return e - n
    return e


cdef bint same_authority(
    const unsigned char* buf,
    Py_ssize_t ss, Py_ssize_t se,
    Py_ssize_t a, Py_ssize_t e,
    Py_ssize_t hs, Py_ssize_t he,
) noexcept nogil:
    """_peek_py.same_authority(): the scheme buf[ss:se], the target's
    authority buf[a:e], the Host header's value buf[hs:he]."""
    cdef const char* port = b""
    cdef Py_ssize_t n = 0, i
    if se - ss == 4 and eq_lower(buf + ss, b"http", 4):
        port, n = b":80", 3
    elif se - ss == 5 and eq_lower(buf + ss, b"https", 5):
        port, n = b":443", 4
    e = bare_end(buf, a, e, port, n)
    he = bare_end(buf, hs, he, port, n)
    if e - a != he - hs:
        return False
    for i in range(e - a):
        if LOWER[buf[a + i]] != LOWER[buf[hs + i]]:
            return False
    return True


cdef object build(Scanner* s, const unsigned char* buf, int* code):
    """The RequestHead of a complete head, or None with code[0] set to an error.

    Mirrors HeadParser._complete() in _peek_py.py: same checks, same order.
    """
    cdef Py_ssize_t ms = s.method_start, me = s.method_end, te = s.target_end
    cdef Py_ssize_t ts = me + 1
    cdef Py_ssize_t p = s.headers_start, i, ls, le, colon, ns, ne, vs, ve, k
    cdef Py_ssize_t host_s = 0, host_e = 0, a, e, scheme_e
    cdef int minor = buf[te + 8] - 0x30
    cdef int host_count = 0, cl_error = 0
    cdef long long cl = -1
    cdef bint te_seen = False, conn_close = False, conn_keep_alive = False
    cdef bint expect_continue = False
    cdef Codings codings
    cdef Field f
    cdef Py_UCS1* out
    cdef list headers = []
    cdef object name, host, path, cl_value = None
    codings.count = codings.chunked = 0

    method = latin1(buf, ms, me)
    target = latin1(buf, ts, te)
    version = latin1(buf, te + 1, te + 9)

    # The header lines were validated as they arrived: only split them here.
    while next_field(buf, p, s.head_length, &f):
        ns = f.ns
        ne = f.ne
        vs = f.vs
        ve = f.ve
        # Names are tokens (ASCII): write the lowercased name straight into
        # a fresh one-byte str instead of decoding and then lowering.
        name = PyUnicode_New(ne - ns, 127)
        out = PyUnicode_1BYTE_DATA(name)
        for k in range(ne - ns):
            out[k] = LOWER[buf[ns + k]]
        headers.append((name, latin1(buf, vs, ve)))

        k = ne - ns
        if k == 4 and eq_lower(buf + ns, b"host", 4):
            host_count += 1
            if host_count == 1:
                host_s = vs
                host_e = ve
        elif k == 14 and eq_lower(buf + ns, b"content-length", 14):
            if cl_error == 0:
                cl_error = parse_content_length(buf, vs, ve, &cl)
        elif k == 17 and eq_lower(buf + ns, b"transfer-encoding", 17):
            te_seen = True
            scan_transfer_encoding(buf, vs, ve, &codings)
        elif k == 10 and eq_lower(buf + ns, b"connection", 10):
            scan_connection(buf, vs, ve, &conn_close, &conn_keep_alive)
        elif k == 6 and eq_lower(buf + ns, b"expect", 6):
            if ve - vs == 12 and eq_lower(buf + vs, b"100-continue", 12):
                expect_continue = True
        p = f.lf + 1

    # Cross-header rules, in the pure twin's order.
    if host_count > 1:
        code[0] = E_HOST_MANY
        return None
    if host_count == 0 and minor >= 1:
        code[0] = E_HOST_MISSING
        return None
    if host_count == 1 and not all_host(buf, host_s, host_e):
        code[0] = E_HOST_INVALID
        return None
    host = latin1(buf, host_s, host_e) if host_count else None

    if me - ms == 7 and memcmp(buf + ms, b"CONNECT", 7) == 0:  # authority-form only
        if not all_host(buf, ts, te):
            code[0] = E_TARGET
            return None
        host = target
        path = ""
    elif buf[ts] == SLASH:  # origin-form
        if has_dot_segment(buf, ts, te):
            code[0] = E_DOT_SEGMENT
            return None
        path = target
    elif te - ts == 1 and buf[ts] == 0x2A:  # "*": asterisk-form, OPTIONS only
        if not (me - ms == 7 and memcmp(buf + ms, b"OPTIONS", 7) == 0):
            code[0] = E_TARGET
            return None
        path = target
    else:  # absolute-form: scheme "://" authority [path-abempty] ["?" query]
        a = ts
        if not ((0x41 <= buf[a] <= 0x5A) or (0x61 <= buf[a] <= 0x7A)):
            code[0] = E_TARGET
            return None
        a += 1
        while a < te and SCHEMEC[buf[a]]:
            a += 1
        if not (te - a >= 3 and buf[a] == COLON and buf[a + 1] == SLASH and buf[a + 2] == SLASH):
            code[0] = E_TARGET
            return None
        scheme_e = a
        a += 3
        e = a
        while e < te and buf[e] != SLASH and buf[e] != QMARK:
            e += 1
        if e == a or not all_host(buf, a, e):
            code[0] = E_TARGET
            return None
        host = latin1(buf, a, e)
        path = latin1(buf, e, te)
        if e == te or buf[e] != SLASH:
            path = "/" + path
        if has_dot_segment(buf, e, te):
            code[0] = E_DOT_SEGMENT
            return None
        if host_count == 1 and not same_authority(buf, ts, scheme_e, a, e, host_s, host_e):
            code[0] = E_HOST_CONFLICT
            return None

    if cl_error:
        code[0] = cl_error
        return None
    chunked = False
    if te_seen:
        if minor == 0:
            code[0] = E_TE_HTTP10
            return None
        if codings.count != 1 or codings.chunked != 1:
            code[0] = E_TE_NOT_CHUNKED
            return None
        if cl >= 0:
            code[0] = E_CL_AND_TE
            return None
        chunked = True
    if cl >= 0:
        cl_value = cl

    return RequestHead(
        method,
        target,
        path,
        version,
        tuple(headers),
        host,
        s.head_length,
        not conn_close and (minor >= 1 or conn_keep_alive),
        cl_value,
        chunked,
        expect_continue and minor >= 1,  # RFC 9110 §10.1.1: ignore it in 1.0
    )


cdef object run(Scanner* s, const unsigned char* buf, Py_ssize_t n, Py_ssize_t max_head):
    """Scan the first max_head bytes of buf[:n]; return the head or None, or raise."""
    cdef int code = scan(s, buf, n if n < max_head else max_head)
    cdef object head = None
    if code == COMPLETE:
        head = build(s, buf, &code)
    if code == NEED_MORE and n > max_head:
        code = E_TOO_LARGE
    if code == COMPLETE:
        s.state = S_DONE
        return head
    if code == NEED_MORE:
        return None
    s.state = S_ERROR
    s.error = code
    raise make_error(code, max_head)


cdef class HeadParser:
    """Incremental request-head parser for one connection (sans-IO).

    See l4proxy.dataplane._peek_py.HeadParser, whose behaviour this class repeats.
    """

    cdef Scanner _s
    cdef unsigned char* _buf  # every byte fed so far (PyMem, owned)
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _max_head
    cdef object _head

    def __init__(self, Py_ssize_t max_head=DEFAULT_MAX_HEAD):
        if max_head < 1:
            raise ValueError(f"max_head must be at least 1, not {max_head}")
        self._max_head = max_head

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def steps(self):
        """Work the scanner has done: loop turns plus bytes handed to each search.

        For tests (an operation count that a quadratic rescan would blow up);
        the twin counts the same way.
        """
        return self._s.steps

    @property
    def buffered(self):
        """Every byte fed so far, in order."""
        if self._len == 0:
            return b""
        return PyBytes_FromStringAndSize(<const char*>self._buf, self._len)

    cdef int _append(self, const unsigned char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap = self._cap
        cdef unsigned char* grown
        if self._len + n > cap:
            cap = cap * 2 if cap else 1024
            while cap < self._len + n:
                cap *= 2
            grown = <unsigned char*>PyMem_Realloc(self._buf, cap)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._cap = cap
        if n:
            memcpy(self._buf + self._len, data, n)
        self._len += n
        return 0

    def feed(self, data):
        """Append *data*; return the head once complete, None if more is needed."""
        cdef Py_buffer view
        if self._max_head < 1:
            raise ValueError("HeadParser.__init__ was not called")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._append(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        if self._s.state == S_DONE:
            return self._head
        if self._s.state == S_ERROR:
            raise make_error(self._s.error, self._max_head)
        self._head = run(&self._s, self._buf, self._len, self._max_head)
        return self._head


def parse_head(data, Py_ssize_t max_head=DEFAULT_MAX_HEAD):
    """One-shot HeadParser.feed: the head in *data*, or None if incomplete.

    Scans *data*'s own buffer (no copy).
    """
    cdef Scanner s
    cdef Py_buffer view
    if max_head < 1:
        raise ValueError(f"max_head must be at least 1, not {max_head}")
    s.state = S_EMPTY
    s.error = 0
    s.pos = s.method_start = s.method_end = s.target_end = 0
    s.vi = s.line_start = s.headers_start = s.head_length = s.steps = 0
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return run(&s, <const unsigned char*>view.buf, view.len, max_head)
    finally:
        PyBuffer_Release(&view)

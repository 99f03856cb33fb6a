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
from libc.string cimport memchr, memcmp, memcpy

from l4proxy.dataplane._peek_py import HeadError, NotHTTP, RequestHead, make_error

__all__ = ["HeadError", "HeadParser", "NotHTTP", "RequestHead", "parse_head"]


cdef extern from "Python.h":
    ctypedef unsigned char Py_UCS1
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    Py_UCS1* PyUnicode_1BYTE_DATA(object o)
    object PyUnicode_DecodeLatin1(const char* s, Py_ssize_t size, const char* errors)


# Result and error codes: the values of the same names in _peek_py.py.
cdef enum:
    NEED_MORE = 0
    COMPLETE = 1
    E_NOT_HTTP_START = 2
    E_NOT_HTTP_METHOD = 3
    E_NOT_HTTP_METHOD_LONG = 4
    E_NOT_HTTP_TARGET = 5
    E_NOT_HTTP_VERSION = 6
    E_NOT_HTTP_H2 = 7
    E_VERSION = 8
    E_REQUEST_LINE_CR = 9
    E_VERSION_UNSUPPORTED = 10
    E_OBS_FOLD = 11
    E_EMPTY_NAME = 12
    E_NO_COLON = 13
    E_NAME_CHAR = 14
    E_VALUE_CHAR = 15
    E_HOST_MANY = 16
    E_HOST_MISSING = 17
    E_HOST_INVALID = 18
    E_TARGET = 19
    E_CL_INVALID = 20
    E_CL_CONFLICT = 21
    E_TE_HTTP10 = 22
    E_TE_NOT_CHUNKED = 23
    E_CL_AND_TE = 24
    E_TOO_LARGE = 25

# Request-line states: the values of _S_* in _peek_py.py.
cdef enum:
    S_EMPTY = 0
    S_EMPTY_CR = 1
    S_METHOD = 2
    S_TARGET0 = 3
    S_TARGET = 4
    S_VERSION = 5
    S_VMAJOR = 6
    S_VDOT = 7
    S_VMINOR = 8
    S_VEND = 9
    S_VCR = 10
    S_HEADERS = 11
    S_DONE = 12
    S_ERROR = 13

cdef enum:
    MAX_METHOD = 32
    MAX_CL_DIGITS = 18
    DEFAULT_MAX_HEAD = 65536
    LF = 0x0A
    CR = 0x0D
    SP = 0x20
    HTAB = 0x09
    COLON = 0x3A
    COMMA = 0x2C
    SEMI = 0x3B
    SLASH = 0x2F
    QMARK = 0x3F

# Byte classes, filled once at import by _init_tables().
cdef unsigned char TCHAR[256]   # RFC 9110 token characters
cdef unsigned char FIELD[256]   # field-value bytes: HTAB, SP, VCHAR, obs-text
cdef unsigned char HOSTC[256]   # Host / authority bytes (see _HOST in _peek_py.py)
cdef unsigned char SCHEMEC[256]  # scheme bytes after the first ALPHA
cdef unsigned char LOWER[256]   # ASCII lowercase; other bytes unchanged


cdef void _init_tables():
    cdef int c
    cdef bytes tchars = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    cdef bytes hostc = b"-._~%!$&'()*+,;=:[]"
    cdef bytes schemec = b"+-."
    for c in range(256):
        TCHAR[c] = 0
        FIELD[c] = c == HTAB or (0x20 <= c <= 0x7E) or c >= 0x80
        HOSTC[c] = (0x30 <= c <= 0x39) or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A)
        SCHEMEC[c] = HOSTC[c]
        LOWER[c] = c + 0x20 if 0x41 <= c <= 0x5A else c
    for c in tchars:
        TCHAR[c] = 1
    for c in hostc:
        HOSTC[c] = 1
    for c in schemec:
        SCHEMEC[c] = 1


_init_tables()


cdef struct Scanner:
    int state
    int error               # the error code once state is S_ERROR
    Py_ssize_t pos          # next byte to scan; everything before it is judged
    Py_ssize_t method_start
    Py_ssize_t method_end   # the SP after the method
    Py_ssize_t target_end   # the SP after the target
    Py_ssize_t vi           # index into "HTTP/" while in S_VERSION
    Py_ssize_t line_start   # start of the current header line
    Py_ssize_t headers_start
    Py_ssize_t head_length
    Py_ssize_t steps  # work done: loop turns + bytes handed to memchr (tests)


cdef const char* HTTP_SLASH = b"HTTP/"
cdef const char* H2_PREFACE_LINE = b"PRI * HTTP/2.0"


cdef inline bint eq_lower(const unsigned char* p, const char* lit, Py_ssize_t n) noexcept nogil:
    """p[:n], ASCII-lowercased, equals the lowercase literal lit[:n]."""
    cdef Py_ssize_t i
    for i in range(n):
        if LOWER[p[i]] != <unsigned char>lit[i]:
            return False
    return True


cdef inline bint all_host(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    while a < b:
        if not HOSTC[buf[a]]:
            return False
        a += 1
    return True


cdef inline bint is_ows(unsigned char c) noexcept nogil:
    return c == SP or c == HTAB


cdef int check_header_line(const unsigned char* buf, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """0 if buf[start:end] (non-empty, CR stripped) is a header line, else why not.

    Same checks, same order, as _header_line_error() in _peek_py.py.
    """
    cdef Py_ssize_t i = start
    cdef unsigned char c = buf[start]
    if c == SP or c == HTAB:
        return E_OBS_FOLD
    if c == COLON:
        return E_EMPTY_NAME
    while i < end and TCHAR[buf[i]]:
        i += 1
    if i == end:
        return E_NO_COLON
    if buf[i] != COLON:
        return E_NAME_CHAR
    i += 1
    while i < end:
        if not FIELD[buf[i]]:
            return E_VALUE_CHAR
        i += 1
    return 0


cdef int scan(Scanner* s, const unsigned char* buf, Py_ssize_t limit) noexcept nogil:
    """Advance over buf[s.pos:limit]: NEED_MORE, COMPLETE or an error code.

    Mirrors HeadParser._scan() in _peek_py.py.
    """
    cdef Py_ssize_t pos = s.pos, start, end, i
    cdef const unsigned char* lf
    cdef unsigned char c
    cdef int state = s.state
    cdef int code = NEED_MORE
    while pos < limit:
        s.steps += 1
        if state == S_HEADERS:
            # Resume the LF search where the last call stopped: O(n) overall.
            s.steps += limit - pos
            lf = <const unsigned char*>memchr(buf + pos, LF, <size_t>(limit - pos))
            if lf == NULL:
                pos = limit
                break
            i = lf - buf
            start = s.line_start
            end = i - 1 if (i > start and buf[i - 1] == CR) else i
            if end == start:  # the empty line: the head is complete
                pos = i + 1
                s.head_length = i + 1
                code = COMPLETE
                break
            code = check_header_line(buf, start, end)
            if code != 0:
                break
            pos = i + 1
            s.line_start = pos
            continue
        c = buf[pos]
        if state == S_EMPTY:
            if c == LF:
                pos += 1
            elif c == CR:
                state = S_EMPTY_CR
                pos += 1
            elif TCHAR[c]:
                state = S_METHOD
                s.method_start = pos
            else:
                code = E_NOT_HTTP_START
                break
        elif state == S_EMPTY_CR:
            if c != LF:
                code = E_NOT_HTTP_START
                break
            state = S_EMPTY
            pos += 1
        elif state == S_METHOD:
            if TCHAR[c]:
                if pos - s.method_start >= MAX_METHOD:
                    code = E_NOT_HTTP_METHOD_LONG
                    break
                pos += 1
            elif c == SP:
                s.method_end = pos
                state = S_TARGET0
                pos += 1
            else:
                code = E_NOT_HTTP_METHOD
                break
        elif state == S_TARGET0:
            if not (0x21 <= c <= 0x7E):
                code = E_NOT_HTTP_TARGET
                break
            state = S_TARGET
            pos += 1
        elif state == S_TARGET:
            if 0x21 <= c <= 0x7E:
                pos += 1
            elif c == SP:
                s.target_end = pos
                state = S_VERSION
                s.vi = 0
                pos += 1
            else:
                code = E_NOT_HTTP_TARGET
                break
        elif state == S_VERSION:
            if c != <unsigned char>HTTP_SLASH[s.vi]:
                code = E_NOT_HTTP_VERSION
                break
            s.vi += 1
            if s.vi == 5:
                state = S_VMAJOR
            pos += 1
        elif state == S_VMAJOR or state == S_VMINOR:
            if not (0x30 <= c <= 0x39):
                code = E_VERSION
                break
            state = S_VDOT if state == S_VMAJOR else S_VEND
            pos += 1
        elif state == S_VDOT:
            if c != 0x2E:  # "."
                code = E_VERSION
                break
            state = S_VMINOR
            pos += 1
        else:  # S_VEND or S_VCR
            if c == CR and state == S_VEND:
                state = S_VCR
                pos += 1
                continue
            if c != LF:
                code = E_VERSION if state == S_VEND else E_REQUEST_LINE_CR
                break
            # The request line is complete.
            i = s.target_end + 1  # "HTTP/"
            if buf[i + 5] != 0x31:  # major version "1"
                if (i + 8 - s.method_start == 14
                        and memcmp(buf + s.method_start, H2_PREFACE_LINE, 14) == 0):
                    code = E_NOT_HTTP_H2
                else:
                    code = E_VERSION_UNSUPPORTED
                break
            pos += 1
            state = S_HEADERS
            s.headers_start = pos
            s.line_start = pos
    s.pos = pos
    s.state = state
    return code


cdef int parse_content_length(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b,
                              long long* cl) noexcept nogil:
    """Fold one Content-Length value (a comma list) into cl[0] (-1: none yet)."""
    cdef Py_ssize_t i = a, es, ee, k
    cdef long long v
    while True:
        es = i
        while i < b and buf[i] != COMMA:
            i += 1
        ee = i
        while es < ee and is_ows(buf[es]):
            es += 1
        while ee > es and is_ows(buf[ee - 1]):
            ee -= 1
        if es == ee or ee - es > MAX_CL_DIGITS:
            return E_CL_INVALID
        v = 0
        for k in range(es, ee):
            if not (0x30 <= buf[k] <= 0x39):
                return E_CL_INVALID
            v = v * 10 + (buf[k] - 0x30)
        if cl[0] < 0:
            cl[0] = v
        elif cl[0] != v:
            return E_CL_CONFLICT
        if i == b:
            return 0
        i += 1  # the comma


cdef struct Codings:
    int count          # transfer-codings seen, over all Transfer-Encoding lines
    int chunked        # how many of them are "chunked"
    bint last_chunked  # the last one is "chunked"


cdef void scan_transfer_encoding(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b,
                                 Codings* t) noexcept nogil:
    cdef Py_ssize_t i = a, es, ee
    cdef bint is_chunked
    while True:
        es = i
        while i < b and buf[i] != COMMA:
            i += 1
        ee = es
        while ee < i and buf[ee] != SEMI:  # the coding's name; parameters follow ";"
            ee += 1
        while es < ee and is_ows(buf[es]):
            es += 1
        while ee > es and is_ows(buf[ee - 1]):
            ee -= 1
        if ee > es:  # empty list elements are ignored (RFC 9110 §5.6.1)
            is_chunked = ee - es == 7 and eq_lower(buf + es, b"chunked", 7)
            t.count += 1
            t.chunked += is_chunked
            t.last_chunked = is_chunked
        if i == b:
            return
        i += 1


cdef void scan_connection(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b,
                          bint* close, bint* keep_alive) noexcept nogil:
    cdef Py_ssize_t i = a, es, ee
    while True:
        es = i
        while i < b and buf[i] != COMMA:
            i += 1
        ee = i
        while es < ee and is_ows(buf[es]):
            es += 1
        while ee > es and is_ows(buf[ee - 1]):
            ee -= 1
        if ee - es == 5 and eq_lower(buf + es, b"close", 5):
            close[0] = True
        elif ee - es == 10 and eq_lower(buf + es, b"keep-alive", 10):
            keep_alive[0] = True
        if i == b:
            return
        i += 1


cdef inline str latin1(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b):
    return PyUnicode_DecodeLatin1(<const char*>buf + a, b - a, NULL)


cdef object build(Scanner* s, const unsigned char* buf, int* code):
    """The RequestHead of a complete head, or None with code[0] set to an error.

    Mirrors HeadParser._complete() in _peek_py.py: same checks, same order.
    """
    cdef Py_ssize_t ms = s.method_start, me = s.method_end, te = s.target_end
    cdef Py_ssize_t ts = me + 1
    cdef Py_ssize_t p = s.headers_start, i, ls, le, colon, ns, ne, vs, ve, k
    cdef Py_ssize_t host_s = 0, host_e = 0, a, e
    cdef int minor = buf[te + 8] - 0x30
    cdef int host_count = 0, cl_error = 0
    cdef long long cl = -1
    cdef bint te_seen = False, conn_close = False, conn_keep_alive = False
    cdef bint expect_continue = False
    cdef Codings codings
    cdef Py_UCS1* out
    cdef list headers = []
    cdef object name, host, path, cl_value = None
    codings.count = codings.chunked = 0
    codings.last_chunked = False

    method = latin1(buf, ms, me)
    target = latin1(buf, ts, te)
    version = latin1(buf, te + 1, te + 9)

    # The header lines were validated as they arrived: only split them here.
    while True:
        i = <const unsigned char*>memchr(buf + p, LF, <size_t>(s.head_length - p)) - buf
        ls = p
        le = i - 1 if (i > ls and buf[i - 1] == CR) else i
        if le == ls:
            break  # the empty line
        colon = <const unsigned char*>memchr(buf + ls, COLON, <size_t>(le - ls)) - buf
        ns = ls
        ne = colon
        vs = colon + 1
        ve = le
        while vs < ve and is_ows(buf[vs]):
            vs += 1
        while ve > vs and is_ows(buf[ve - 1]):
            ve -= 1
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
        p = i + 1

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

    if cl_error:
        code[0] = cl_error
        return None
    chunked = False
    if te_seen:
        if minor == 0:
            code[0] = E_TE_HTTP10
            return None
        if codings.count == 0 or not codings.last_chunked or codings.chunked != 1:
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

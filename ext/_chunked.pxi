# The chunked-body machine of ext/framing.pyx, shared (``include``) by the
# modules that frame bodies without the GIL: ext/framing.pyx (the BodyFramer
# twin) and ext/relay.pyx. C declarations and nogil functions only; include
# ext/_bytes.pxi first. The state and error numbers are those of
# l4proxy/dataplane/_framing_py.py.

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

cdef int64_t C_MAX_CHUNK_SIZE = MAX_CHUNK_SIZE
cdef int C_MAX_CHUNK_LINE = MAX_CHUNK_LINE

# Byte classes, filled once at import.
cdef signed char HEX[256]
cdef bint CK_TCHAR[256]


cdef void _init_chunked_tables() noexcept:
    cdef int c
    for c in range(256):
        HEX[c] = -1
        CK_TCHAR[c] = 0
    for c in range(10):
        HEX[0x30 + c] = c
    for c in range(6):
        HEX[0x41 + c] = 10 + c
        HEX[0x61 + c] = 10 + c
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        CK_TCHAR[c] = 1


_init_chunked_tables()


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
    """Run the machine over data[0:n]; the bytes consumed (error: C_ERROR,
    and the bytes before the refused one: the caller forwards them before it
    gives up, as it would have had that byte come in a read of its own)."""
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
                elif CK_TCHAR[c]:
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
                elif not CK_TCHAR[c]:
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
            k.state = C_ERROR
            return i - 1
    k.state = state
    return i

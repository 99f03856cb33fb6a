# The request-head scanner of ext/peek.pyx, shared (``include``) by the
# modules that scan request heads without the GIL: ext/peek.pyx (the
# HeadParser twin) and ext/relay.pyx (the compiled relay). C declarations and
# nogil functions only; include ext/_bytes.pxi first, cimport memchr and
# memcmp from libc.string and uint64_t from libc.stdint.

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
    E_DOT_SEGMENT = 26
    E_HOST_CONFLICT = 27
    E_BARE_LF = 28

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


# Where scan_into() found a head's header lines: line i's colon and LF
# (offsets into the buffer, as the Scanner's), for a reader of the lines
# after it (the relay's summarize()) not to find them again with memchr.
# One per scanning thread, not per Scanner: it holds the lines one call
# judged, for the head of the Scanner that call scanned (lines_whole():
# all of that head's when its lines all came in that call).
cdef enum:
    MAX_LINES = 32

cdef struct Lines:
    const Scanner *owner   # whose head (scan_into()'s Scanner)
    Py_ssize_t first       # where the first line recorded starts (-1: the
                           # head's first, not reached at the call's start)
    int n                  # lines recorded; -1: more than MAX_LINES
    Py_ssize_t colon[MAX_LINES]
    Py_ssize_t lf[MAX_LINES]


cdef const char* HTTP_SLASH = b"HTTP/"
cdef const char* H2_PREFACE_LINE = b"PRI * HTTP/2.0"


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Whether the word x, ASCII-lowercased, is the word l of a lowercase
       ASCII literal: bit 5 is set in x only where l has a letter (a byte
       of l is 0x61..0x7A when l + 0x1F carries into bit 7 and l + 0x05
       does not; no carry crosses a byte, l < 0x80). Exact: at a letter,
       only the letter and its capital have it once bit 5 is set; elsewhere
       x must be l as it is. */
    static inline int l4_word_is(uint64_t x, uint64_t l) {
        uint64_t letter = (l + 0x1F1F1F1F1F1F1F1FULL) & ~(l + 0x0505050505050505ULL)
                          & 0x8080808080808080ULL;
        return (x | (letter >> 2)) == l;
    }
    /* p[:n] (n < 8) as the low bytes of a word: two loads that overlap
       where n is not their size, never a byte past p[n - 1] (a byte loop
       was ~4 instructions a byte, the literal's too). */
    static inline uint64_t l4_load_upto8(const unsigned char *p, size_t n) {
        uint32_t a, b;
        uint16_t c, d;
        if (n >= 4) {
            memcpy(&a, p, 4);
            memcpy(&b, p + n - 4, 4);
            return (uint64_t)a | ((uint64_t)b << (8 * (n - 4)));
        }
        if (n >= 2) {
            memcpy(&c, p, 2);
            memcpy(&d, p + n - 2, 2);
            return (uint64_t)c | ((uint64_t)d << (8 * (n - 2)));
        }
        return n ? p[0] : 0;
    }
    /* p[:n] is the lowercase ASCII literal lit[:n], whatever the case of
       p's letters: a word at a time, the last word overlapping the one
       before it; a literal under 8 bytes, in one word. */
    static inline int l4_eq_lower(const unsigned char *p, const char *lit, size_t n) {
        const unsigned char *l = (const unsigned char *)lit;
        uint64_t x, y;
        size_t i;
        if (n < 8)
            return l4_word_is(l4_load_upto8(p, n), l4_load_upto8(l, n));
        for (i = 0; i + 8 < n; i += 8) {
            memcpy(&x, p + i, 8);
            memcpy(&y, l + i, 8);
            if (!l4_word_is(x, y)) return 0;
        }
        memcpy(&x, p + n - 8, 8);
        memcpy(&y, l + n - 8, 8);
        return l4_word_is(x, y);
    }
    """
    bint eq_lower_words "l4_eq_lower"(const unsigned char* p, const char* lit, size_t n) noexcept nogil
    uint64_t load_upto8 "l4_load_upto8"(const unsigned char* p, size_t n) noexcept nogil


cdef inline bint eq_lower(const unsigned char* p, const char* lit, Py_ssize_t n) noexcept nogil:
    """p[:n], ASCII-lowercased, equals the lowercase literal lit[:n] (LOWER,
    a word at a time)."""
    return eq_lower_words(p, lit, <size_t>n)


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #ifdef __SSE2__
    #include <emmintrin.h>
    /* Which of the 16 bytes are letters, digits, ".", ":" or "-" (a bit
       each): Host bytes all (HOSTC), the common ones. */
    static inline unsigned l4_hostish16(__m128i x) {
        __m128i t = _mm_sub_epi8(_mm_or_si128(x, _mm_set1_epi8(0x20)), _mm_set1_epi8(0x61));
        __m128i d = _mm_sub_epi8(x, _mm_set1_epi8(0x2D));  /* - . / 0..9 : */
        __m128i ok = _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(t, _mm_set1_epi8(25)), t),
                                  _mm_cmpeq_epi8(_mm_min_epu8(d, _mm_set1_epi8(13)), d));
        ok = _mm_andnot_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(0x2F)), ok);  /* not "/" */
        return (unsigned)_mm_movemask_epi8(ok);
    }
    #endif
    /* Whether p[:n] is all letters, digits, ".", ":" or "-": then all are
       Host bytes; 0 says nothing (the caller judges byte by byte). 16
       bytes at a time, the last 16 overlapping; 8 to 15, two words that
       overlap; fewer, 0 (short: byte by byte is cheap). */
    static inline int l4_host_fast(const unsigned char *p, size_t n) {
    #ifdef __SSE2__
        size_t i;
        if (n >= 16) {
            for (i = 0; i + 16 < n; i += 16)
                if (l4_hostish16(_mm_loadu_si128((const __m128i *)(p + i))) != 0xFFFF) return 0;
            return l4_hostish16(_mm_loadu_si128((const __m128i *)(p + n - 16))) == 0xFFFF;
        }
        if (n >= 8)
            return l4_hostish16(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)p),
                                                   _mm_loadl_epi64((const __m128i *)(p + n - 8)))) == 0xFFFF;
    #endif
        (void)p;
        (void)n;
        return 0;
    }
    """
    bint host_fast "l4_host_fast"(const unsigned char* p, size_t n) noexcept nogil


cdef inline bint all_host(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    if b > a and host_fast(buf + a, <size_t>(b - a)):
        return True
    while a < b:
        if not HOSTC[buf[a]]:
            return False
        a += 1
    return True


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Whether no byte of p[:n] is below 0x20 or is 0x7F, read a word at a
       time (the last word overlapping the one before it): then all are
       field-value bytes (RFC 9110 5.5). A byte below 0x20 borrows in x -
       0x20.., a 0x7F is a zero once XORed with 0x7F..; a byte of 0x80 or
       more is neither. 0 also for HTAB, which is a field-value byte: the
       caller then judges byte by byte. */
    #define L4_ONES64 0x0101010101010101ULL
    #define L4_HIGH64 0x8080808080808080ULL
    static inline int l4_plain64(uint64_t x) {
        uint64_t y = x ^ (0x7F * L4_ONES64);
        return !(((x - 0x20 * L4_ONES64) & ~x & L4_HIGH64) | ((y - L4_ONES64) & ~y & L4_HIGH64));
    }
    static inline int l4_plain32(uint32_t x) {
        uint32_t y = x ^ 0x7F7F7F7FU;
        return !(((x - 0x20202020U) & ~x & 0x80808080U) | ((y - 0x01010101U) & ~y & 0x80808080U));
    }
    /* Whether every byte of the word is visible ASCII, 0x21..0x7E: none
       borrows in x - 0x21.. (below 0x21), none has bit 7 set in x or in
       x + 0x01.. (0x7F and up; a carry only leaves a byte that is already
       one). */
    static inline int l4_visible64(uint64_t x) {
        return !((((x - 0x21 * L4_ONES64) & ~x) | x | (x + L4_ONES64)) & L4_HIGH64);
    }
    static inline int l4_visible(const unsigned char *p, size_t n) {
        uint64_t x;
        size_t i;
        if (n >= 8) {
            for (i = 0; i + 8 < n; i += 8) {
                memcpy(&x, p + i, 8);
                if (!l4_visible64(x)) return 0;
            }
            memcpy(&x, p + n - 8, 8);
            return l4_visible64(x);
        }
        for (i = 0; i < n; i++)
            if (p[i] < 0x21 || p[i] > 0x7E) return 0;
        return 1;
    }
    static inline int l4_plain(const unsigned char *p, size_t n) {
        uint64_t x;
        uint32_t w;
        size_t i;
        if (n >= 8) {
            for (i = 0; i + 8 < n; i += 8) {
                memcpy(&x, p + i, 8);
                if (!l4_plain64(x)) return 0;
            }
            memcpy(&x, p + n - 8, 8);
            return l4_plain64(x);
        }
        if (n >= 4) {
            memcpy(&w, p, 4);
            if (!l4_plain32(w)) return 0;
            memcpy(&w, p + n - 4, 4);
            return l4_plain32(w);
        }
        for (i = 0; i < n; i++)
            if (p[i] < 0x20 || p[i] == 0x7F) return 0;
        return 1;
    }
    """
    bint plain "l4_plain"(const unsigned char* p, size_t n) noexcept nogil
    bint visible "l4_visible"(const unsigned char* p, size_t n) noexcept nogil


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <sys/types.h>
    #ifdef __SSE2__
    #include <emmintrin.h>
    #endif
    /* Where the field value from p[j] ends in p[:n]: the index of the CR of
       its CRLF when every byte before it is a field-value byte (HTAB, SP,
       VCHAR, obs-text: RFC 9110 5.5); -1 when p[j:n] ends first (no
       refused byte yet: more may come); -2 at a refused byte (a control
       but HTAB, DEL, a CR not before an LF, a bare LF): the line's LF is
       the caller's to find. One pass: the LF search and the check of each
       byte together, 16 bytes at a time (SSE2; else 8, a word), byte by
       byte only at a control byte and in the last 15 (7). */
    static inline ssize_t l4_value_end(const unsigned char *p, ssize_t j, ssize_t n) {
        unsigned char c;
    #ifdef __SSE2__
        const __m128i c1f = _mm_set1_epi8(0x1F), del = _mm_set1_epi8(0x7F);
    #endif
        for (;;) {
    #ifdef __SSE2__
            if (j + 16 <= n) {
                __m128i x = _mm_loadu_si128((const __m128i *)(p + j));
                __m128i ctl = _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(x, c1f), x),
                                           _mm_cmpeq_epi8(x, del));
                unsigned m = (unsigned)_mm_movemask_epi8(ctl);
                if (!m) { j += 16; continue; }
                j += __builtin_ctz(m);
            } else
    #else
            if (j + 8 <= n) {
                uint64_t x, y, m;
                memcpy(&x, p + j, 8);
                y = x ^ 0x7F7F7F7F7F7F7F7FULL;
                /* the lowest byte flagged is exact (a borrow only runs up) */
                m = ((x - 0x2020202020202020ULL) & ~x & 0x8080808080808080ULL)
                    | ((y - 0x0101010101010101ULL) & ~y & 0x8080808080808080ULL);
                if (!m) { j += 8; continue; }
                j += __builtin_ctzll(m) >> 3;
            } else
    #endif
            {
                if (j >= n) return -1;
                c = p[j];
                if (c >= 0x20 && c != 0x7F) { j++; continue; }
            }
            c = p[j];
            if (c == 0x09) { j++; continue; }
            if (c == 0x0D) {
                if (j + 1 >= n) return -1;
                return p[j + 1] == 0x0A ? j : -2;
            }
            return -2;
        }
    }
    /* The length of the header name at p[0:16] when it is 1 to 15 letters,
       digits or "-" and a ":" follows (the common case: every byte of it a
       token byte); 0 otherwise, for the caller to judge byte by byte. p[:16]
       must be readable. */
    static inline int l4_name_fast(const unsigned char *p) {
    #ifdef __SSE2__
        __m128i x = _mm_loadu_si128((const __m128i *)p);
        unsigned colon = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(x, _mm_set1_epi8(0x3A)));
        __m128i t, d, ok;
        unsigned want;
        int k;
        if (!colon) return 0;
        k = __builtin_ctz(colon);
        /* a letter: x | 0x20 in a..z; a digit: x in 0..9 (unsigned ranges) */
        t = _mm_sub_epi8(_mm_or_si128(x, _mm_set1_epi8(0x20)), _mm_set1_epi8(0x61));
        d = _mm_sub_epi8(x, _mm_set1_epi8(0x30));
        ok = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(t, _mm_set1_epi8(25)), t),
                                       _mm_cmpeq_epi8(_mm_min_epu8(d, _mm_set1_epi8(9)), d)),
                          _mm_cmpeq_epi8(x, _mm_set1_epi8(0x2D)));
        want = (1u << k) - 1;
        return ((unsigned)_mm_movemask_epi8(ok) & want) == want ? k : 0;
    #else
        (void)p;
        return 0;
    #endif
    }
    """
    Py_ssize_t value_end "l4_value_end"(const unsigned char* p, Py_ssize_t j, Py_ssize_t n) noexcept nogil
    int name_fast "l4_name_fast"(const unsigned char* p) noexcept nogil


cdef inline bint field_ok(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Every byte of p[:n] is a field-value byte (FIELD): words at a time,
    byte by byte only where a control byte (HTAB, or a refused one) is."""
    cdef Py_ssize_t i
    if plain(p, <size_t>n):
        return True
    for i in range(n):
        if not FIELD[p[i]]:
            return False
    return True


cdef inline bint is_ows(unsigned char c) noexcept nogil:
    return c == SP or c == HTAB


cdef inline Py_ssize_t dot_at(const unsigned char* buf, Py_ssize_t i, Py_ssize_t b) noexcept nogil:
    """The length of the dot at buf[i] ("." 1, "%2e" or "%2E" 3), 0 if none."""
    if buf[i] == 0x2E:
        return 1
    if buf[i] == 0x25 and i + 2 < b and buf[i + 1] == 0x32 and LOWER[buf[i + 2]] == 0x65:
        return 3
    return 0


# (inline: the relay's fast_head() and edit_request() both call it; out of
# line, every request on the fast path would pay a call)
cdef inline bint has_dot_segment(const unsigned char* buf, Py_ssize_t a,
                                 Py_ssize_t b) noexcept nogil:
    """Whether the path buf[a:b] has a dot-segment: "/" or "\\", one or two
    dots ("." or %2e, any case), then "/", "\\", "#", "?" or b. Read up to
    the first "?". The pure twin's has_dot_segment() (see its "Decisions")."""
    cdef Py_ssize_t i = a, n
    cdef int dots
    cdef unsigned char c
    while i < b:
        c = buf[i]
        if c == QMARK:
            return False
        i += 1
        if c != SLASH and c != BACKSLASH:
            continue
        dots = 0
        while dots < 2 and i < b:
            n = dot_at(buf, i, b)
            if n == 0:
                break
            i += n
            dots += 1
        if dots and (i == b or buf[i] == SLASH or buf[i] == BACKSLASH
                     or buf[i] == HASH or buf[i] == QMARK):
            return True
    return False


cdef int check_header_line(const unsigned char* buf, Py_ssize_t start, Py_ssize_t end,
                           Py_ssize_t* colon) noexcept nogil:
    """0 if buf[start:end] (non-empty, CR stripped) is a header line (colon:
    where its colon is), else why not.

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
    colon[0] = i
    i += 1
    if not field_ok(buf + i, end - i):
        return E_VALUE_CHAR
    return 0


cdef bint request_line_at_once(Scanner* s, const unsigned char* buf, Py_ssize_t limit) noexcept nogil:
    """The request line, judged whole when it is all in buf[:limit] and is
    the plain form: a method (1 to MAX_METHOD token bytes), SP, a target of
    visible bytes, SP, "HTTP/1." and a digit, CRLF. Then s is where the
    byte-by-byte states below would leave it (S_HEADERS at the next line);
    anything else leaves s as it was (but for steps) and they judge it,
    errors and all. One LF search: a line without its LF yet is not looked
    at again (the states have moved on from S_EMPTY)."""
    cdef const unsigned char* lf = <const unsigned char*>memchr(buf, LF, <size_t>limit)
    cdef Py_ssize_t e, i = 0, t
    if lf == NULL:
        s.steps += limit
        return False
    e = lf - buf
    s.steps += e + 1
    while i < e and TCHAR[buf[i]]:
        i += 1
    if i == 0 or i > MAX_METHOD or buf[i] != SP or e < i + 12:
        return False
    t = e - 10  # " HTTP/1.1\r"
    if buf[t] != SP or memcmp(buf + t + 1, HTTP_SLASH, 5) != 0 or buf[t + 6] != 0x31 \
            or buf[t + 7] != 0x2E or not (0x30 <= buf[t + 8] <= 0x39) or buf[t + 9] != CR:
        return False
    if not visible(buf + i + 1, <size_t>(t - i - 1)):
        return False
    s.method_start = 0
    s.method_end = i
    s.target_end = t
    s.vi = 5
    s.state = S_HEADERS
    s.pos = s.headers_start = s.line_start = e + 1
    return True


cdef inline int scan(Scanner* s, const unsigned char* buf, Py_ssize_t limit) noexcept nogil:
    """Advance over buf[s.pos:limit]: NEED_MORE, COMPLETE or an error code.

    Mirrors HeadParser._scan() in _peek_py.py (the request line at once when
    it is plain, request_line_at_once()).
    """
    return scan_into(s, buf, limit, NULL)


# Header lines at once: a header line whose first bytes are a name of 1 to
# 15 letters, digits or "-" and its ":" (name_fast(): one 16-byte compare)
# and whose value's bytes are field-value bytes up to a CRLF (value_end(),
# 16 bytes at a time) is a header line as check_header_line() judges one,
# its LF the first after its start: scan_into() takes it so, where it
# searched for the LF with memchr() and judged the name a byte at a time,
# then the value. Any other line (a bare LF, obs-fold, a token byte that is
# not a letter, a digit or "-", a longer name, a refused byte, a line not
# all here) goes the way it went, its error found there. The empty line
# that ends the head is taken at once too. Each is counted in s.steps as
# the LF search counted it (loop turn, bytes handed to it).

cdef int scan_into(Scanner* s, const unsigned char* buf, Py_ssize_t limit,
                   Lines* L) noexcept nogil:
    """scan(), noting in L (when not NULL) the header lines this call judges."""
    cdef Py_ssize_t pos = s.pos, start, end, i, colon = 0
    cdef const unsigned char* lf
    cdef unsigned char c
    cdef int state = s.state
    cdef int code = NEED_MORE
    if L != NULL:
        L.owner = s
        L.first = s.line_start if state == S_HEADERS else -1
        L.n = 0
    if state == S_EMPTY and pos == 0 and limit > 0 and TCHAR[buf[0]] \
            and request_line_at_once(s, buf, limit):
        pos = s.pos
        state = S_HEADERS
    while pos < limit:
        s.steps += 1
        if state == S_HEADERS:
            # Resume the LF search where the last call stopped: O(n) overall.
            s.steps += limit - pos
            if pos == s.line_start:
                # a line not searched yet: the common ones at once (see
                # "Header lines at once" above), counted as the search below
                # would have counted them
                if pos + 1 < limit and buf[pos] == CR and buf[pos + 1] == LF:
                    pos += 2
                    s.head_length = pos
                    code = COMPLETE
                    break
                colon = name_fast(buf + pos) if pos + 16 <= limit else 0
                if colon:
                    colon += pos
                    i = value_end(buf, colon + 1, limit)
                    if i >= 0:  # its CR, an LF after it
                        if L != NULL:
                            if 0 <= L.n < MAX_LINES:
                                L.colon[L.n] = colon
                                L.lf[L.n] = i + 1
                                L.n += 1
                            else:
                                L.n = -1
                        pos = i + 2
                        s.line_start = pos
                        continue
            lf = <const unsigned char*>memchr(buf + pos, LF, <size_t>(limit - pos))
            if lf == NULL:
                pos = limit
                break
            i = lf - buf
            start = s.line_start
            if i == start or buf[i - 1] != CR:  # a bare LF: refused
                code = E_BARE_LF
                break
            end = i - 1
            if end == start:  # the empty line: the head is complete
                pos = i + 1
                s.head_length = i + 1
                code = COMPLETE
                break
            code = check_header_line(buf, start, end, &colon)
            if code != 0:
                break
            if L != NULL:
                if 0 <= L.n < MAX_LINES:
                    L.colon[L.n] = colon
                    L.lf[L.n] = i
                    L.n += 1
                else:
                    L.n = -1
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
            if state == S_VEND:  # a bare LF ends it: refused
                code = E_BARE_LF
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
    int count          # list elements seen, over all Transfer-Encoding lines (empty ones too)
    int chunked        # how many of them are "chunked"


cdef void scan_transfer_encoding(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b,
                                 Codings* t) noexcept nogil:
    cdef Py_ssize_t i = a, es, ee
    cdef bint is_chunked, params
    while True:
        es = i
        while i < b and buf[i] != COMMA:
            i += 1
        ee = es
        while ee < i and buf[ee] != SEMI:  # the coding's name; parameters follow ";"
            ee += 1
        params = ee < i
        while es < ee and is_ows(buf[es]):
            es += 1
        while ee > es and is_ows(buf[ee - 1]):
            ee -= 1
        # every element counts, an empty one too: only exactly one chunked
        # is accepted (the pure twin's "Decisions"); chunked has no
        # parameters (RFC 9112 §7.1): "chunked;x=1" is another coding, which
        # a server may not take for chunked
        is_chunked = not params and ee - es == 7 and eq_lower(buf + es, b"chunked", 7)
        t.count += 1
        t.chunked += is_chunked
        if i == b:
            return
        i += 1


# What the tokens of a Connection value are (an empty token is none of these).
cdef enum:
    TOK_CLOSE = 1
    TOK_KEEP = 2
    TOK_OTHER = 4          # a token other than close and keep-alive: one of
    TOK_TE = 8             # ... "te" (with TOK_OTHER)
    TOK_FIELD = 16         # ... any other (with TOK_OTHER) but:
    TOK_UPGRADE = 32       # ... "upgrade" (with TOK_OTHER)


cdef int connection_tokens(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    """The tokens of the Connection value buf[a:b] (a comma list, each
    without the OWS around it), as TOK_* bits."""
    cdef Py_ssize_t i = a, es, ee
    cdef int t = 0
    # the common values, whole (a value is trimmed of its OWS)
    if b - a == 10 and eq_lower(buf + a, b"keep-alive", 10):
        return TOK_KEEP
    if b - a == 5 and eq_lower(buf + a, b"close", 5):
        return TOK_CLOSE
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
            t |= TOK_CLOSE
        elif ee - es == 10 and eq_lower(buf + es, b"keep-alive", 10):
            t |= TOK_KEEP
        elif ee - es == 2 and eq_lower(buf + es, b"te", 2):
            t |= TOK_OTHER | TOK_TE
        elif ee - es == 7 and eq_lower(buf + es, b"upgrade", 7):
            t |= TOK_OTHER | TOK_UPGRADE
        elif ee > es:
            t |= TOK_OTHER | TOK_FIELD
        if i == b:
            return t
        i += 1


cdef inline void scan_connection(const unsigned char* buf, Py_ssize_t a, Py_ssize_t b,
                                 bint* close, bint* keep_alive) noexcept nogil:
    cdef int t = connection_tokens(buf, a, b)
    if t & TOK_CLOSE:
        close[0] = True
    if t & TOK_KEEP:
        keep_alive[0] = True


cdef struct Field:
    # One header line of a validated head: buf[ls:lf] is the line (lf: its
    # LF), buf[ns:ne] the name, buf[vs:ve] the value without OWS.
    Py_ssize_t ls, lf, ns, ne, vs, ve


cdef inline bint next_field(const unsigned char* buf, Py_ssize_t p, Py_ssize_t end,
                            Field* f) noexcept nogil:
    """The header line starting at p of a head scanned COMPLETE (end: its
    length); False at the empty line that ends it (f.lf is then its LF).
    The lines were validated as they arrived: this only splits them."""
    cdef Py_ssize_t i, le
    i = <const unsigned char*>memchr(buf + p, LF, <size_t>(end - p)) - buf
    f.ls = p
    f.lf = i
    le = i - 1 if (i > p and buf[i - 1] == CR) else i
    if le == p:
        return False
    field_at(buf, p, <const unsigned char*>memchr(buf + p, COLON, <size_t>(le - p)) - buf,
             i, f)
    return True


cdef inline void field_at(const unsigned char* buf, Py_ssize_t p, Py_ssize_t colon,
                          Py_ssize_t lf, Field* f) noexcept nogil:
    """The header line from p to its LF (lf), whose colon is at colon: where
    scan_into() found them (Lines), or next_field()."""
    f.ls = p
    f.lf = lf
    f.ns = p
    f.ne = colon
    f.vs = colon + 1
    f.ve = lf - 1 if buf[lf - 1] == CR else lf
    while f.vs < f.ve and is_ows(buf[f.vs]):
        f.vs += 1
    while f.ve > f.vs and is_ows(buf[f.ve - 1]):
        f.ve -= 1


cdef inline bint lines_whole(const Lines* L, const Scanner* s) noexcept nogil:
    """Whether L holds every header line of s's head, scanned COMPLETE by
    the call that filled L (its lines came in that call)."""
    return L.owner == s and L.n >= 0 and (L.first < 0 or L.first == s.headers_start)

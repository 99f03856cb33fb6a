# A gateway listener's forwarding headers, compiled: the twin of
# l4proxy/dataplane/forwarding.py (included by relay.pyx).
#
# Read the theory of operation there. A connection accepted on a gateway
# listener (Lst.gateway, or handed over with an origin whose ``gateway`` is
# set) of a relay made with ``forwarding`` has a Fwd_ (Conn.fwd, made by
# fwd_conn() with the connection: its client's address asked once, through
# conn_peer()); every other connection has NULL there. summarize() notes,
# for such a head only (h.n_xff 0, not -1), the lines the forwarding
# headers replace (as drops, beside the hop-by-hop lines: the drop list's
# bound sends a head with more to the pure relay) and X-Forwarded-For's
# values (FWD_MAX_XFF lines at most, more to the pure relay too);
# fwd_stage() then stages the head as sent upstream in c.rhead, where
# on_head() stages any other one. A head with none of those lines (most)
# gets the connection's block: its lines made once (Fwd_.block:
# X-Forwarded-For and x-envoy-external-address of the peer,
# X-Forwarded-Proto), then ``x-request-id: `` and the id, its request's
# half written in place in the block, then the block's CR LF as the head's
# empty line: one copy after the head's lines. Others have their lines
# made per request (fwd_lines(), through Relay.fwd_lines: not inlined
# into on_head()). An id's halves are draws of
# the relay's splitmix64 stream (Relay.rid, seeded by Python:
# forwarding.request_id_state()): the connection's made into text once
# (uuid_tail), the request's per request (uuid_head: 16 hex digits in
# SSE2, no table, no loop). What routes and the verdict cache read is the
# head as received (c.inb), as before; the access log reads the staged
# head's values (log_capture()).

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <arpa/inet.h>
    #ifdef __SSE2__
    #include <emmintrin.h>
    #endif

    /* splitmix64 (forwarding._splitmix): the next draw of *s */
    static inline uint64_t l4_splitmix(uint64_t *s) {
        uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }

    static inline uint64_t l4_be64(uint64_t x) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        return __builtin_bswap64(x);
    #else
        return x;
    #endif
    }

    /* x's 16 hex digits (its bytes big-endian, lowercase): the first 8
       characters in *w0, the last 8 in *w1 (as they lie in memory) */
    static inline void l4_hex16(uint64_t x, uint64_t *w0, uint64_t *w1) {
    #ifdef __SSE2__
        /* each byte as two nibbles in a byte of their own, then '0' + n,
           and 39 more above 9 ('a' for 10) */
        __m128i v = _mm_cvtsi64_si128((long long)l4_be64(x));
        __m128i m = _mm_set1_epi8(0x0F);
        __m128i a = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
        a = _mm_add_epi8(_mm_add_epi8(a, _mm_set1_epi8(0x30)),
                         _mm_and_si128(_mm_cmpgt_epi8(a, _mm_set1_epi8(9)), _mm_set1_epi8(0x27)));
        *w0 = (uint64_t)_mm_cvtsi128_si64(a);
        *w1 = (uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(a, a));
    #else
        static const char d[] = "0123456789abcdef";
        char hex[16];
        int i;
        for (i = 15; i >= 0; i--) { hex[i] = d[x & 15]; x >>= 4; }
        memcpy(w0, hex, 8);
        memcpy(w1, hex + 8, 8);
    #endif
    }

    /* a request's draw as the first half of its uuid4's text
       (forwarding.uuid_text's hi, the version set): its hex digits at
       out[0:8], out[9:13], out[14:18] (the dashes between are the
       caller's: written once) */
    static inline void l4_uuid_head(char *out, uint64_t x) {
        uint64_t w0, w1;
        uint32_t q;
        l4_hex16((x & ~0xF000ULL) | 0x4000ULL, &w0, &w1);
        memcpy(out, &w0, 8);
        q = (uint32_t)w1;
        memcpy(out + 9, &q, 4);
        q = (uint32_t)(w1 >> 32);
        memcpy(out + 14, &q, 4);
    }

    /* a connection's draw as the second half (uuid_text's lo, the variant
       set): 18 bytes at out, "-HHHH-HHHHHHHHHHHH" */
    static inline void l4_uuid_tail(char *out, uint64_t x) {
        uint64_t w0, w1;
        uint32_t q;
        l4_hex16((x & 0x3FFFFFFFFFFFFFFFULL) | 0x8000000000000000ULL, &w0, &w1);
        out[0] = '-';
        q = (uint32_t)w0;
        memcpy(out + 1, &q, 4);
        out[5] = '-';
        q = (uint32_t)(w0 >> 32);
        memcpy(out + 6, &q, 4);
        memcpy(out + 10, &w1, 8);
    }

    /* a packed address (conn_peer()'s 4 or 16 bytes) as X-Forwarded-For
       appends it (forwarding.peer_text: an IPv4-mapped one as IPv4), at
       most 45 bytes and a NUL at out; its length, 0 for none */
    static int l4_fwd_peer_text(char *out, const unsigned char *packed, int n) {
        static const unsigned char mapped[12] = {0,0,0,0,0,0,0,0,0,0,0xFF,0xFF};
        const char *t = NULL;
        if (n == 4)
            t = inet_ntop(AF_INET, packed, out, INET6_ADDRSTRLEN);
        else if (n == 16 && memcmp(packed, mapped, 12) == 0)
            t = inet_ntop(AF_INET, packed + 12, out, INET6_ADDRSTRLEN);
        else if (n == 16)
            t = inet_ntop(AF_INET6, packed, out, INET6_ADDRSTRLEN);
        return t == NULL ? 0 : (int)strlen(out);
    }

    /* p[:n] as an IP address's canonical text (forwarding.ip_text); its
       length, 0 when it is none */
    static int l4_fwd_ip_text(char *out, const char *p, size_t n) {
        char s[64];
        unsigned char a[16];
        int af = AF_INET;
        if (n == 0 || n >= sizeof s)
            return 0;
        memcpy(s, p, n);
        s[n] = 0;
        if (inet_pton(AF_INET, s, a) != 1) {
            af = AF_INET6;
            if (inet_pton(AF_INET6, s, a) != 1)
                return 0;
        }
        return inet_ntop(af, a, out, INET6_ADDRSTRLEN) == NULL ? 0 : (int)strlen(out);
    }

    static inline int l4_fwd_space(char c) {
        return c == ' ' || c == '\\t' || c == '\\r' || c == '\\n' || c == '\\v' || c == '\\f';
    }

    /* text[:n] (l4_fwd_trusted()'s canonical text) packed, as
       forwarding.packed_ip() packs it: AF_INET's 4 bytes, else AF_INET6's
       16, at out; its length, 0: none */
    static int l4_fwd_pack(unsigned char *out, const char *text, int n) {
        char s[64];
        if (n <= 0 || n >= (int)sizeof s)
            return 0;
        memcpy(s, text, (size_t)n);
        s[n] = 0;
        if (inet_pton(AF_INET, s, out) == 1)
            return 4;
        return inet_pton(AF_INET6, s, out) == 1 ? 16 : 0;
    }

    /* forwarding.trusted_address(): the hops-th address from the right of
       X-Forwarded-For p[:n], canonical, at out; its length, 0: none */
    static int l4_fwd_trusted(char *out, const char *p, size_t n, int hops) {
        size_t s = n, i;
        int k;
        for (k = 1; k < hops; k++) {
            while (s > 0 && p[s - 1] != ',') s--;
            if (s == 0) return 0;
            s--;
        }
        i = s;
        while (i > 0 && p[i - 1] != ',') i--;
        while (i < s && l4_fwd_space(p[i])) i++;
        while (s > i && l4_fwd_space(p[s - 1])) s--;
        return l4_fwd_ip_text(out, p + i, s - i);
    }
    """
    uint64_t splitmix "l4_splitmix"(uint64_t *s) noexcept nogil
    void uuid_head "l4_uuid_head"(char *out, uint64_t x) noexcept nogil
    void uuid_tail "l4_uuid_tail"(char *out, uint64_t x) noexcept nogil
    int fwd_peer_text "l4_fwd_peer_text"(char *out, const unsigned char *packed,
                                         int n) noexcept nogil
    int fwd_trusted "l4_fwd_trusted"(char *out, const char *p, size_t n, int hops) noexcept nogil
    int fwd_pack "l4_fwd_pack"(unsigned char *out, const char *text, int n) noexcept nogil


cdef enum:
    FWD_ADDR = 48          # an address's text and its NUL (INET6_ADDRSTRLEN, rounded)
    # Fwd_.block: its lines, the id's line, the first try's
    # x-envoy-attempt-count line, the empty line: at most 242 bytes (17 + 45
    # + 2, 25, 26 + 45 + 2, 14 + 36 + 2, 26, 2: forwarding.py's "The bound")
    FWD_BLOCK = 264
    UUID_LEN = 36

cdef struct Fwd_:
    # a gateway listener's connection's (Conn.fwd; see above)
    int peer_len           # 0: its client has no IP address (nothing appended)
    int rid_at             # where block's "x-request-id: " starts: the lines before
                           # it are the connection's, for a head without any of its own
    int tail_at            # ... and where the x-envoy-attempt-count line after the id's
                           # ends: CR LF, the head's empty line
    int src_len            # the current request's trusted client address, taken from its
    unsigned char src[16]  #     X-Forwarded-For (--trusted-proxies), packed: what a hash on
                           #     the source IP reads (hash_source()); 0: the connection's peer
    char peer[FWD_ADDR]
    char block[FWD_BLOCK]

# forwarding.EDGE_REMOVED: the names whose lines go (x-request-id apart),
# their bytes held by the tuple for the module's life
cdef tuple _FWD_NAMES = _forwarding.EDGE_REMOVED
cdef int N_FWD_NAMES = len(_FWD_NAMES)
cdef const char *FWD_NAME[32]
cdef int FWD_NAME_LEN[32]


cdef void _fwd_names() except *:
    cdef int i
    cdef bytes name
    if N_FWD_NAMES > 32:
        raise ImportError("forwarding.EDGE_REMOVED has more names than FWD_NAME holds")
    for i in range(N_FWD_NAMES):
        name = _FWD_NAMES[i]
        FWD_NAME[i] = name
        FWD_NAME_LEN[i] = len(name)


_fwd_names()


cdef int fwd_conn(Relay *R, Conn *c) noexcept nogil:
    """c's Fwd_, for a gateway listener's connection (new_conn()): its
    client's address (conn_peer(): accept()'s, kept by new_conn()), and
    the block's lines (forwarded_head()'s for a head without
    X-Forwarded-For, and without X-Forwarded-Proto where it stays), then
    the id's line and the first try's x-envoy-attempt-count line
    (stage_attempt()'s). -1 when out of memory."""
    cdef Fwd_ *f = <Fwd_*>calloc(1, sizeof(Fwd_))
    cdef int n = 0, k
    if f == NULL:
        return -1
    k = conn_peer(c)
    f.peer_len = fwd_peer_text(f.peer, c.peer, k) if k > 0 else 0
    if f.peer_len:
        memcpy(f.block, b"x-forwarded-for: ", 17)
        memcpy(f.block + 17, f.peer, <size_t>f.peer_len)
        n = 17 + f.peer_len
        memcpy(f.block + n, b"\r\n", 2)
        n += 2
    memcpy(f.block + n, b"x-forwarded-proto: http\r\n", 25)
    n += 25
    if f.peer_len:
        memcpy(f.block + n, b"x-envoy-external-address: ", 26)
        memcpy(f.block + n + 26, f.peer, <size_t>f.peer_len)
        n += 26 + f.peer_len
        memcpy(f.block + n, b"\r\n", 2)
        n += 2
    f.rid_at = n
    memcpy(f.block + n, b"x-request-id: ", 14)
    n += 14
    f.block[n + 8] = f.block[n + 13] = 0x2D  # (a request's dashes: uuid_head's)
    uuid_tail(f.block + n + 18, splitmix(&R.rid))  # (the connection's draw)
    n += UUID_LEN
    # the id's line's end, the first try's count (after the connection
    # manager's lines, as Envoy's router sets it), the head's end: CR LF
    memcpy(f.block + n, b"\r\nx-envoy-attempt-count: 1\r\n\r\n", 30)
    f.tail_at = n + 28
    c.fwd = f
    return 0


cdef void fwd_field(Relay *R, Head *h, const unsigned char *buf, Py_ssize_t ls, Py_ssize_t lf,
                    Py_ssize_t ns, Py_ssize_t k, Py_ssize_t vs, Py_ssize_t ve) noexcept nogil:
    """summarize()'s, for a line of a gateway listener's head (h.n_xff not
    -1) whose name begins with "x" and has 12 bytes or more: whether it
    goes (a drop) and what fwd_stage() reads of it (forwarded_head()'s
    loop)."""
    cdef int j
    if k == 15 and eq_lower(buf + ns, b"x-forwarded-for", 15):
        if vs < ve:  # (an empty value joins nothing)
            if h.n_xff == FWD_MAX_XFF:
                h.drop_overflow = True  # (more lines: the pure relay)
            else:
                h.xff_s[h.n_xff] = vs
                h.xff_e[h.n_xff] = ve
                h.n_xff += 1
        drop_line(h, ls, lf)
    elif k == 17 and eq_lower(buf + ns, b"x-forwarded-proto", 17):
        if R.fwd_hops == 0:
            drop_line(h, ls, lf)  # (an untrusted hop's: overwritten)
        else:
            h.xfp = True
    elif k == 12 and eq_lower(buf + ns, b"x-request-id", 12):
        drop_line(h, ls, lf)
    else:
        for j in range(N_FWD_NAMES):
            if k == FWD_NAME_LEN[j] and eq_lower(buf + ns, FWD_NAME[j], k):
                drop_line(h, ls, lf)
                break


cdef int fwd_lines(Relay *R, Conn *c, Head *h) noexcept nogil:
    """fwd_stage()'s for a head with lines to drop (hop-by-hop ones too),
    X-Forwarded-For or an X-Forwarded-Proto that stays: its lines but the
    drops, then the forwarding headers' lines made for it
    (forwarded_head()'s), the id's line, the first try's
    x-envoy-attempt-count line, its empty line. Through
    Relay.fwd_lines: never inlined into on_head(). Nonzero when out of
    memory."""
    cdef Fwd_ *f = c.fwd
    cdef Buf *o = &c.rhead
    cdef const unsigned char *b = <const unsigned char*>c.inb.p
    cdef Py_ssize_t hl = c.s.head_length, p = 0
    cdef Py_ssize_t end = hl - 2  # (the empty line's CR LF: scan_into())
    cdef char ext[FWD_ADDR]
    cdef int i, failed = 0, n = 0
    cdef size_t start
    for i in range(h.n_drop):
        failed |= buf_add(o, c.inb.p + p, <size_t>(h.drop_s[i] - p))
        p = h.drop_e[i]
    failed |= buf_add(o, c.inb.p + p, <size_t>(end - p))
    if h.n_xff or f.peer_len:
        failed |= buf_add(o, b"x-forwarded-for: ", 17)
        start = o.len
        for i in range(h.n_xff):
            if i:
                failed |= buf_add(o, b",", 1)
            failed |= buf_add(o, <const char*>b + h.xff_s[i], <size_t>(h.xff_e[i] - h.xff_s[i]))
        if R.fwd_hops and h.n_xff and not failed:  # (the trusted client, before the append)
            n = fwd_trusted(ext, o.p + start, o.len - start, R.fwd_hops)
            f.src_len = fwd_pack(f.src, ext, n)  # (what a hash on the source IP reads)
        if f.peer_len:
            if h.n_xff:
                failed |= buf_add(o, b",", 1)
            failed |= buf_add(o, f.peer, <size_t>f.peer_len)
        failed |= buf_add(o, b"\r\n", 2)
    if not h.xfp:
        failed |= buf_add(o, b"x-forwarded-proto: http\r\n", 25)
    if n:
        failed |= buf_add(o, b"x-envoy-external-address: ", 26)
        failed |= buf_add(o, ext, <size_t>n)
        failed |= buf_add(o, b"\r\n", 2)
    elif f.peer_len:
        failed |= buf_add(o, b"x-envoy-external-address: ", 26)
        failed |= buf_add(o, f.peer, <size_t>f.peer_len)
        failed |= buf_add(o, b"\r\n", 2)
    failed |= buf_add(o, f.block + f.rid_at, <size_t>(f.tail_at - f.rid_at))  # (and the count's)
    failed |= buf_add(o, c.inb.p + end, <size_t>(hl - end))
    return failed


cdef inline int hash_source(Conn *c, const unsigned char **p) noexcept nogil:
    """The client address a hash on the source IP reads (HK_SOURCE_IP; a
    decide_peer relay's *peer*), packed, at *p; its length, -1 when
    unknown: a gateway listener's request's trusted client address taken
    from its X-Forwarded-For (--trusted-proxies: what its
    x-envoy-external-address says, and Envoy's downstream remote address
    then), else the connection's peer (conn_peer())."""
    if c.fwd != NULL and c.fwd.src_len:
        p[0] = c.fwd.src
        return c.fwd.src_len
    p[0] = c.peer
    return conn_peer(c)


cdef int fwd_stage(Relay *R, Conn *c, Head *h) noexcept nogil:
    """The head as sent upstream (upstream_head() then forwarded_head()),
    staged in c.rhead: the head's lines but h's drops, the forwarding
    headers' lines, a new x-request-id, the first try's
    x-envoy-attempt-count, the empty line. Nonzero when out of memory."""
    cdef Fwd_ *f = c.fwd
    cdef Buf *o = &c.rhead
    cdef size_t hl = <size_t>c.s.head_length, n = <size_t>f.tail_at + 2
    f.src_len = 0  # (the peer's, unless fwd_lines() takes one from X-Forwarded-For)
    # the request's half of its id, written in the block
    uuid_head(f.block + f.rid_at + 14, splitmix(&R.rid))
    if h.n_drop or h.n_xff or h.xfp:
        return R.fwd_lines(R, c, h)
    # most: the head but its empty line, then the connection's lines, the
    # id's, the count's, and the block's CR LF as the head's empty line
    if buf_add(o, c.inb.p, hl - 2) != 0:
        return -1
    if o.off + o.len + n > o.cap:  # (else room: buf_add()'s call saved)
        return buf_add(o, f.block, n)
    memcpy(o.p + o.len, f.block, n)
    o.len += n
    return 0

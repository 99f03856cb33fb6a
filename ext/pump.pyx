# cython: language_level=3
"""The pump, compiled: relay bytes between two TCP sockets without the GIL.

Theory of operation
===================

A :class:`Pump` owns one background thread. That thread spends its whole life
in ``run_loop()``, a C function entered ``with nogil`` that never touches a
Python object: it owns an epoll instance, every relayed connection's state, and
one scratch buffer. Python talks to it only through ``Loop.lock`` (a pthread
mutex guarding the hand-off queue and two flags) plus an eventfd that wakes
``epoll_wait``; counters are read with relaxed atomic loads.

Ownership of file descriptors
-----------------------------
``add()`` takes both fds. From that moment exactly one party closes them:

* while they sit in the hand-off queue, whoever empties the queue (the loop,
  or ``close()``/``__dealloc__`` when no loop runs);
* once registered, the loop, through ``conn_close()`` and nothing else.

An fd is removed from epoll (EPOLL_CTL_DEL) *before* it is closed: epoll
registrations belong to the open file description, not to the fd number, so if
anyone still held a dup() of the socket, a bare close() would leave a live
registration pointing at freed memory.

A connection closed while handling one epoll batch may still have events later
in that same batch. Its ``Conn`` is therefore only marked ``closed`` and put on
a graveyard list; the memory is freed after the batch. fd numbers freed during
a batch cannot alias a new connection in that batch: new connections are only
registered after it.

One connection, two directions
------------------------------
``side[0]`` is the client, ``side[1]`` the upstream. ``dir[d]`` moves bytes
read from ``side[d]`` to ``side[1-d]`` (``dir[0]``: client → upstream). Each
direction is a small state machine, driven by ``dir_step()``:

1. flush what it holds (its heap buffer, or the bytes in its pipe), in order;
   while anything is held the source is not read (backpressure: epoll interest
   in the source's EPOLLIN is dropped, EPOLLOUT on the destination is added);
2. if the source reached EOF, ``shutdown(dst, SHUT_WR)``: the half-close is
   propagated and this direction is done, the other keeps flowing;
3. read and write, at most ``STEP_BUDGET`` bytes per wake-up (fairness between
   connections; epoll is level-triggered, so it brings us back).

When both directions are done, both sockets are closed (they have sent and
received FIN: close() sends nothing more). A reset or error on either socket
aborts the connection: SO_LINGER {1, 0} on both sockets, then close(), so the
surviving peer sees a RST rather than a clean EOF that would pass a truncated
stream off as complete.

Buffers and splice
------------------
An idle connection costs one ``Conn`` (no buffers). Reads go into the loop's
shared scratch buffer and are sent immediately; only when send() is partial is
the remainder copied into a heap buffer owned by that direction (at most
``buffer_size`` bytes), freed as soon as it drains. Once a direction has moved
``splice_threshold`` bytes and holds nothing, it switches to splice(2) through
a pipe of its own: socket → pipe → socket, the bytes never enter user space.
So the bytes held by the pump per direction never exceed max(buffer_size, pipe
size).

Pipes (HAProxy's ``maxpipes`` and pipe pool)
--------------------------------------------
Pipes come from a pool owned by the loop: at most ``max_pipes`` exist (in use
+ pooled: 2 fds each, budgeted with the connections, see l4proxy/dataplane/pump.py). A
direction gives its pipe back when it is done (EOF propagated) or its
connection closes; only an empty pipe is pooled (``pipe_bytes`` is exact: it
counts what splice() put in and took out), one still holding bytes is closed,
so no connection's bytes can reach another. When no pipe is to be had
(``max_pipes`` in use, or pipe2() fails: EMFILE, ENFILE, ENOMEM) the refusal
is counted and that direction keeps to recv/send, asking again after another
``PIPE_RETRY`` bytes: fds come back as connections close, so a refusal is
never permanent.

Urgent data
-----------
A send(MSG_OOB) puts an urgent mark in the stream. We read with SO_OOBINLINE:
the urgent byte is relayed in its place, as an ordinary byte (the urgency
itself is not re-created upstream). Without it recv() skips the byte (and the
kernel keeps only the last mark, so reading it aside with MSG_OOB could not
be relied on either): the stream would lose bytes. HAProxy drops the urgent
byte; we keep every byte, so a telnet "IAC DM" or an FTP abort arrives whole.
splice() cannot cross a mark at all: tcp_read_sock() stops at it whatever
SO_OOBINLINE says, returning EAGAIN while epoll reports the bytes behind it
(a spin), or 0 once the FIN is queued (a clean EOF, bytes dropped). So when
splice() reads nothing, ``sockatmark()`` asks whether a mark is next; if so
one recv() takes the urgent byte and what follows, which clears the mark, and
splice resumes (counted as ``urgent``).

Ends reported back (tokens)
---------------------------
``add(..., token=t)`` with ``t`` != 0 asks to hear of that connection's end:
once both its sockets are closed (however: both directions done, a reset,
the idle timeout, a drain's deadline, ``close()``, or a hand-off that never
became a connection) ``t`` goes on the ended list, which ``ended()`` takes,
and the ``ended_fd`` eventfd turns readable when that list stops being
empty. The sidecar's event loop watches that fd: it is how the worker
learns that a connection it counted against an endpoint (LEAST_REQUEST) is
gone, and (``ends()``: the same list, each end with the bytes moved each
way and when, on CLOCK_MONOTONIC, it ended) what the access log's line of
a connection routed at L4 says of it. The list's node is allocated by
``add()`` (with the GIL; a failure there raises, as any failure of
``add()``): the loop never allocates to report an end, so no end is ever
lost; it fills in the node's bytes and time as it closes the connection
(a few stores and a clock read per connection with a token, nothing per
byte). An ``add()`` that raises reports nothing: that connection never
was the pump's.

Kernel notes
------------
* We do not ask for EPOLLRDHUP: a peer's FIN makes the socket readable and
  recv() returns 0, which is all we need. EPOLLHUP and EPOLLERR are reported
  whatever the interest mask; a side with nothing to wait for stays registered
  with mask 0 so that a RST still wakes us, except after an EPOLLHUP we cannot
  act on (it is level-triggered and would spin): then the side is deleted.
* send() uses MSG_NOSIGNAL: writing to a reset socket returns EPIPE instead of
  raising SIGPIPE, whatever the process's signal disposition.
* splice() uses SPLICE_F_NONBLOCK (the pipe side never blocks) and
  SPLICE_F_MOVE (a hint; pages are moved where possible).
* Every syscall retries on EINTR; EAGAIN means "wait for epoll".
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy
from libc.errno cimport errno, EAGAIN, EINTR, ECONNRESET, EPIPE

cimport linux as sys_

import threading
import time as _time

# -- counters ---------------------------------------------------------------
# Written by the loop thread (and add()), read by any thread: relaxed atomics.

cdef extern from *:
    """
    #define L4_ADD(p, v) ((void)__atomic_fetch_add((p), (v), __ATOMIC_RELAXED))
    #define L4_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    """
    void L4_ADD(int64_t *p, int64_t v) nogil
    int64_t L4_LOAD(int64_t *p) nogil

cdef enum:
    C_ACTIVE
    C_ACCEPTED
    C_CLOSED
    C_BYTES_UP
    C_BYTES_DOWN
    C_RESETS
    C_IDLE
    C_ERRORS
    C_SPLICED
    C_BUFFERED
    C_FORCE_CLOSED
    C_WAKEUPS
    C_URGENT
    C_PIPES_USED
    C_PIPES_FREE
    C_PIPE_REFUSALS
    N_CTR

_COUNTER_NAMES = (
    "active",
    "accepted",
    "closed",
    "bytes_upstream",
    "bytes_downstream",
    "resets",
    "idle_timeouts",
    "errors",
    "spliced",
    "buffered",
    "force_closed",
    "wakeups",
    "urgent",
    "pipes_used",
    "pipes_free",
    "pipe_refusals",
)

cdef enum:
    R_OK = 0      # progress made or waiting on epoll
    R_RESET = 1   # a peer reset (ECONNRESET, EPIPE): abort, counted as a reset
    R_ERROR = 2   # anything else: abort, counted as an error

cdef enum:
    MAX_EVENTS = 256
    STEP_BUDGET = 1 << 20   # bytes per direction per wake-up
    PIPE_RETRY = 1 << 20    # after a refused pipe, bytes moved before asking again

cdef int64_t NEVER = 0x7fffffffffffffff


# -- state ------------------------------------------------------------------

cdef struct Conn

cdef struct Ended:
    # an end to report (add(..., token)): allocated by add(), owned by the
    # hand-off, then by its connection, then by the ended list
    int64_t token
    int64_t up           # bytes moved client -> upstream (dir[0].moved)
    int64_t down         # bytes moved upstream -> client
    double at            # when it ended (CLOCK_MONOTONIC, now_s())
    Ended *next

cdef struct Side:
    int fd
    int idx              # 0 = client, 1 = upstream
    bint in_epoll        # registered (possibly with mask 0)
    uint32_t mask        # the interest last given to epoll
    Conn *conn

cdef struct Dir:
    # Bytes read from the source that the destination has not accepted yet.
    # Heap-owned by this direction; NULL whenever empty (idle costs nothing).
    char *pend
    size_t pend_off
    size_t pend_len
    # splice mode: a pipe owned by this direction, -1 until the switch.
    int pipe_r
    int pipe_w
    size_t pipe_cap
    size_t pipe_bytes    # bytes sitting in the pipe, not yet spliced out
    int64_t moved        # bytes written to the destination so far
    int64_t splice_at    # ... at which to ask for a pipe (again, after a refusal)
    bint eof             # the source returned EOF
    bint done            # ... and it was propagated: shutdown(dst, SHUT_WR)
    bint splicing

cdef struct Conn:
    Side side[2]
    Dir dir[2]
    Conn *prev           # LRU by last activity, head = least recent
    Conn *next
    Conn *grave_next
    double last_active
    Ended *end           # reported when the connection closes; NULL: no token
    bint closed
    bint spliced

cdef struct Pipe:
    # A pooled pipe: empty, sized to the loop's buffer_size, owned by the pool.
    int r
    int w
    size_t cap
    Pipe *next

cdef struct Handoff:
    int cfd
    int ufd
    char *pend_up        # heap copies of the caller's pending bytes, owned here
    size_t pend_up_len
    char *pend_down
    size_t pend_down_len
    Ended *end           # NULL: no token
    Handoff *next

cdef struct Loop:
    # fixed at creation
    int epfd
    int wakefd
    int endfd            # eventfd: readable while ended_head is not empty
    size_t bufsize
    int64_t threshold
    double idle
    int64_t max_pipes    # pipes in use + pooled never exceed this
    # guarded by lock
    sys_.pthread_mutex_t lock
    Handoff *q_head
    Handoff *q_tail
    bint accepting
    bint stop
    bint force
    Ended *ended_head    # ends not taken by ended() yet, oldest first
    Ended *ended_tail
    # owned by the loop thread
    char *scratch
    Conn *lru_head
    Conn *lru_tail
    Conn *grave
    Pipe *pool           # empty pipes for reuse (HAProxy's pipe pool)
    # atomics
    int64_t ctr[<int>N_CTR]


cdef inline double now_s() noexcept nogil:
    cdef sys_.timespec ts
    sys_.clock_gettime(sys_.CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline bint would_block(int err) noexcept nogil:
    # EWOULDBLOCK is EAGAIN on Linux (the only platform this module targets).
    return err == EAGAIN


cdef inline int classify(int err) noexcept nogil:
    if err == ECONNRESET or err == EPIPE:
        return R_RESET
    return R_ERROR


cdef inline void set_linger0(int fd) noexcept nogil:
    cdef sys_.linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    sys_.setsockopt(fd, sys_.SOL_SOCKET, sys_.SO_LINGER, &lg, sizeof(lg))


cdef inline void wake(Loop *L) noexcept nogil:
    cdef uint64_t one = 1
    # Fails only with EAGAIN when the counter would overflow: then the loop is
    # already awake.
    sys_.write(L.wakefd, &one, sizeof(one))


# -- LRU (idle timeout) -----------------------------------------------------

cdef inline void lru_unlink(Loop *L, Conn *c) noexcept nogil:
    if c.prev != NULL:
        c.prev.next = c.next
    else:
        L.lru_head = c.next
    if c.next != NULL:
        c.next.prev = c.prev
    else:
        L.lru_tail = c.prev
    c.prev = NULL
    c.next = NULL


cdef inline void lru_append(Loop *L, Conn *c) noexcept nogil:
    c.prev = L.lru_tail
    c.next = NULL
    if L.lru_tail != NULL:
        L.lru_tail.next = c
    else:
        L.lru_head = c
    L.lru_tail = c


cdef inline void touch(Loop *L, Conn *c, double now) noexcept nogil:
    c.last_active = now
    if L.lru_tail != c:
        lru_unlink(L, c)
        lru_append(L, c)


# -- connection lifetime ----------------------------------------------------

cdef void report_end(Loop *L, Ended *e) noexcept nogil:
    """Put a connection's end on the ended list (see "Ends reported back");
    the eventfd is written when the list was empty (ended() empties it)."""
    cdef uint64_t one = 1
    cdef bint was_empty
    if e == NULL:
        return
    e.next = NULL
    e.at = now_s()
    sys_.pthread_mutex_lock(&L.lock)
    was_empty = L.ended_head == NULL
    if L.ended_tail != NULL:
        L.ended_tail.next = e
    else:
        L.ended_head = e
    L.ended_tail = e
    sys_.pthread_mutex_unlock(&L.lock)
    if was_empty and L.endfd >= 0:
        sys_.write(L.endfd, &one, sizeof(one))


cdef void conn_close(Loop *L, Conn *c, bint reset) noexcept nogil:
    """Close both sockets exactly once, release buffers and pipes; the Conn
    itself is freed after the current epoll batch (see the graveyard)."""
    cdef int i
    cdef Dir *x
    cdef sys_.epoll_event ev
    if c.closed:
        return
    c.closed = 1
    for i in range(2):
        if c.side[i].in_epoll:
            sys_.epoll_ctl(L.epfd, sys_.EPOLL_CTL_DEL, c.side[i].fd, &ev)
            c.side[i].in_epoll = 0
        if reset:
            set_linger0(c.side[i].fd)
        sys_.close(c.side[i].fd)
        c.side[i].fd = -1
        x = &c.dir[i]
        L4_ADD(&L.ctr[C_BUFFERED], -<int64_t>(x.pend_len + x.pipe_bytes))
        free(x.pend)
        x.pend = NULL
        x.pend_len = 0
        pipe_put(L, x)      # pooled if empty, closed if it still holds bytes
        x.pipe_bytes = 0
    lru_unlink(L, c)
    c.grave_next = L.grave
    L.grave = c
    L4_ADD(&L.ctr[C_ACTIVE], -1)
    L4_ADD(&L.ctr[C_CLOSED], 1)
    if c.end != NULL:
        c.end.up = c.dir[0].moved
        c.end.down = c.dir[1].moved
    report_end(L, c.end)
    c.end = NULL


cdef void conn_abort(Loop *L, Conn *c, int why) noexcept nogil:
    L4_ADD(&L.ctr[C_RESETS if why == R_RESET else C_ERRORS], 1)
    conn_close(L, c, 1)


cdef void bury(Loop *L) noexcept nogil:
    cdef Conn *c = L.grave
    cdef Conn *n
    while c != NULL:
        n = c.grave_next
        free(c)
        c = n
    L.grave = NULL


cdef int set_interest(Loop *L, Conn *c, int i, bint hup) noexcept nogil:
    """Tell epoll what side ``i`` waits for; 0 or -1 (errno set)."""
    cdef Side *s = &c.side[i]
    cdef Dir *rd = &c.dir[i]        # reads from side i
    cdef Dir *wr = &c.dir[1 - i]    # writes to side i
    cdef uint32_t want = 0
    cdef sys_.epoll_event ev
    cdef int op
    if not rd.eof and rd.pend_len == 0 and rd.pipe_bytes == 0:
        want |= sys_.EPOLLIN
    if wr.pend_len != 0 or wr.pipe_bytes != 0:
        want |= sys_.EPOLLOUT
    if want == 0 and (hup or not s.in_epoll):
        # EPOLLHUP is level-triggered and ignores the mask: a side that has
        # hung up and has nothing for us would spin the loop. Stop watching
        # it; the other side (or the idle timeout) ends the connection.
        if s.in_epoll:
            sys_.epoll_ctl(L.epfd, sys_.EPOLL_CTL_DEL, s.fd, &ev)
            s.in_epoll = 0
        return 0
    if s.in_epoll and want == s.mask:
        return 0
    ev.events = want
    ev.data.ptr = s
    op = sys_.EPOLL_CTL_MOD if s.in_epoll else sys_.EPOLL_CTL_ADD
    if sys_.epoll_ctl(L.epfd, op, s.fd, &ev) < 0:
        return -1
    s.in_epoll = 1
    s.mask = want
    return 0


cdef int open_pipe(Loop *L, Dir *x) noexcept nogil:
    cdef int p[2]
    cdef int cap
    if sys_.pipe2(p, sys_.O_NONBLOCK | sys_.O_CLOEXEC) < 0:
        return -1
    # Bound what the pipe may hold: it is this direction's buffer now. The
    # kernel rounds up to a power-of-two number of pages; ask what we got.
    sys_.fcntl(p[1], sys_.F_SETPIPE_SZ, <int>L.bufsize)
    cap = sys_.fcntl(p[1], sys_.F_GETPIPE_SZ)
    if cap <= 0:
        sys_.close(p[0])
        sys_.close(p[1])
        return -1
    x.pipe_r = p[0]
    x.pipe_w = p[1]
    x.pipe_cap = <size_t>cap
    return 0


cdef int pipe_get(Loop *L, Dir *x) noexcept nogil:
    """Give direction ``x`` a pipe: a pooled one, else a new one while fewer
    than ``max_pipes`` exist. 0, or -1 when refused (counted; the caller stays
    on recv/send and asks again later: a refusal is never permanent)."""
    cdef Pipe *p = L.pool
    if p != NULL:
        L.pool = p.next
        x.pipe_r = p.r
        x.pipe_w = p.w
        x.pipe_cap = p.cap
        free(p)
        L4_ADD(&L.ctr[C_PIPES_FREE], -1)
        L4_ADD(&L.ctr[C_PIPES_USED], 1)
        return 0
    # The pool is empty, so every pipe that exists is in use. pipe2() fails
    # with EMFILE/ENFILE when the fds are gone (also ENOMEM): refuse, do not
    # remember it, since fds come back as connections close.
    if L4_LOAD(&L.ctr[C_PIPES_USED]) < L.max_pipes and open_pipe(L, x) == 0:
        L4_ADD(&L.ctr[C_PIPES_USED], 1)
        return 0
    L4_ADD(&L.ctr[C_PIPE_REFUSALS], 1)
    return -1


cdef void pipe_put(Loop *L, Dir *x) noexcept nogil:
    """Take back direction ``x``'s pipe, if it has one. Only an empty pipe
    goes to the pool (``pipe_bytes`` counts exactly what splice() put in and
    took out); one that still holds bytes of a dying connection is closed,
    so no byte can ever leak into another connection."""
    cdef Pipe *p = NULL
    if x.pipe_r < 0:
        return
    if x.pipe_bytes == 0:
        p = <Pipe *>malloc(sizeof(Pipe))
    if p != NULL:
        p.r = x.pipe_r
        p.w = x.pipe_w
        p.cap = x.pipe_cap
        p.next = L.pool
        L.pool = p
        L4_ADD(&L.ctr[C_PIPES_FREE], 1)
    else:
        sys_.close(x.pipe_r)
        sys_.close(x.pipe_w)
    L4_ADD(&L.ctr[C_PIPES_USED], -1)
    x.pipe_r = x.pipe_w = -1
    x.splicing = 0


cdef void pool_close(Loop *L) noexcept nogil:
    """Close every pooled pipe (the pump is closing)."""
    cdef Pipe *p
    while L.pool != NULL:
        p = L.pool
        L.pool = p.next
        sys_.close(p.r)
        sys_.close(p.w)
        free(p)
        L4_ADD(&L.ctr[C_PIPES_FREE], -1)


cdef inline void moved(Loop *L, Conn *c, int d, ssize_t n, double now) noexcept nogil:
    c.dir[d].moved += n
    L4_ADD(&L.ctr[C_BYTES_UP if d == 0 else C_BYTES_DOWN], n)
    touch(L, c, now)


cdef int dir_step(Loop *L, Conn *c, int d, double now) noexcept nogil:
    """Move bytes for direction ``d`` until it would block; R_OK/RESET/ERROR."""
    cdef Dir *x = &c.dir[d]
    cdef int src = c.side[d].fd
    cdef int dst = c.side[1 - d].fd
    cdef size_t budget = STEP_BUDGET
    cdef ssize_t n, m
    cdef bint drained = 0     # the last read was short: the source is empty
    cdef bint spliced = 0     # splice() read something in this call
    if x.done:
        return R_OK
    while True:
        # 1. Flush, in order. A direction never holds heap bytes and pipe
        #    bytes at once (it only switches to splice when the heap is empty).
        if x.pend_len:
            n = sys_.send_nc(dst, x.pend + x.pend_off, x.pend_len,
                          sys_.MSG_NOSIGNAL | sys_.MSG_DONTWAIT)
            if n < 0:
                if errno == EINTR:
                    continue
                if would_block(errno):
                    return R_OK
                return classify(errno)
            x.pend_off += n
            x.pend_len -= n
            L4_ADD(&L.ctr[C_BUFFERED], -n)
            moved(L, c, d, n, now)
            if x.pend_len:
                return R_OK
            free(x.pend)
            x.pend = NULL
            x.pend_off = 0
        if x.pipe_bytes:
            n = sys_.splice(x.pipe_r, NULL, dst, NULL, x.pipe_bytes,
                            sys_.SPLICE_F_MOVE | sys_.SPLICE_F_NONBLOCK)
            if n < 0:
                if errno == EINTR:
                    continue
                if would_block(errno):
                    return R_OK
                return classify(errno)
            x.pipe_bytes -= n
            L4_ADD(&L.ctr[C_BUFFERED], -n)
            moved(L, c, d, n, now)
            if x.pipe_bytes:
                return R_OK
        # 2. Propagate EOF once everything before it was delivered.
        if x.eof:
            # ENOTCONN here means the peer is already gone; the next event on
            # that socket says how, so the error is not acted on here.
            sys_.shutdown(dst, sys_.SHUT_WR)
            x.done = 1
            pipe_put(L, x)      # empty now: back to the pool, for others
            touch(L, c, now)
            return R_OK
        if drained or budget == 0:
            return R_OK     # level-triggered epoll reports the rest
        # 3. Read (and write straight through).
        if not x.splicing and x.moved >= x.splice_at:
            if pipe_get(L, x) == 0:
                x.splicing = 1
                if not c.spliced:
                    c.spliced = 1
                    L4_ADD(&L.ctr[C_SPLICED], 1)
            else:
                # No pipe now (max_pipes in use, or no fds): this stretch goes
                # through recv/send; ask again after PIPE_RETRY more bytes.
                x.splice_at = x.moved + PIPE_RETRY
        if x.splicing:
            n = sys_.splice(src, NULL, x.pipe_w, NULL, x.pipe_cap,
                            sys_.SPLICE_F_MOVE | sys_.SPLICE_F_NONBLOCK)
            if n > 0:
                spliced = 1
                x.pipe_bytes = n
                L4_ADD(&L.ctr[C_BUFFERED], n)
                # No "short read means empty" shortcut here: a pipe holds one
                # skb fragment per slot, so splice often returns less than
                # pipe_cap while more is queued on the socket.
                budget -= min(budget, <size_t>n)
                continue
            if n < 0:
                if errno == EINTR:
                    continue
                if not would_block(errno):
                    return classify(errno)
            # EAGAIN ("empty") and 0 ("EOF") may both be false here. splice
            # reads through tcp_read_sock(), which stops at an urgent mark
            # (send(MSG_OOB)) whatever SO_OOBINLINE says: EAGAIN for ever while
            # epoll reports the bytes behind the mark (a spin), and 0 once the
            # FIN is queued (a clean EOF with those bytes dropped). Only
            # recvmsg() reads past the mark: at the mark, one recv() below
            # takes the urgent byte (inline) and what follows, which clears
            # the mark, and the next round splices again. The pipe is empty
            # here, so the order of bytes is kept. An EAGAIN after progress
            # is not checked (no syscall per wake-up): epoll reports the
            # bytes behind a mark again, and that wake-up checks.
            if (n < 0 and spliced) or sys_.sockatmark(src) != 1:
                if n == 0:
                    x.eof = 1
                    continue
                return R_OK
            L4_ADD(&L.ctr[C_URGENT], 1)
        n = sys_.recv_nc(src, L.scratch, L.bufsize, sys_.MSG_DONTWAIT)
        if n < 0:
            if errno == EINTR:
                continue
            if would_block(errno):
                return R_OK
            return classify(errno)
        if n == 0:
            x.eof = 1
            continue
        while True:
            m = sys_.send_nc(dst, L.scratch, n, sys_.MSG_NOSIGNAL | sys_.MSG_DONTWAIT)
            if m < 0 and errno == EINTR:
                continue
            break
        if m < 0:
            if not would_block(errno):
                return classify(errno)
            m = 0
        if m:
            moved(L, c, d, m, now)
        if m < n:
            # The scratch buffer is shared: keep the tail in a heap buffer of
            # exactly its size, owned by this direction until it drains.
            x.pend = <char *>malloc(n - m)
            if x.pend == NULL:
                return R_ERROR
            memcpy(x.pend, L.scratch + m, n - m)
            x.pend_off = 0
            x.pend_len = n - m
            L4_ADD(&L.ctr[C_BUFFERED], n - m)
            return R_OK
        drained = <size_t>n < L.bufsize
        budget -= min(budget, <size_t>n)


cdef void on_event(Loop *L, Side *s, uint32_t events, double now) noexcept nogil:
    cdef Conn *c = s.conn
    cdef int i = s.idx
    cdef int r = R_OK
    cdef int err = 0
    cdef sys_.socklen_t errlen = sizeof(err)
    cdef bint hup = (events & sys_.EPOLLHUP) != 0
    if c.closed:
        return      # closed earlier in this batch; freed after it
    if events & sys_.EPOLLERR:
        if sys_.getsockopt(s.fd, sys_.SOL_SOCKET, sys_.SO_ERROR, &err, &errlen) == 0 and err:
            # What the peer sent before its reset goes on first, as a
            # direct connection would deliver it (the error is read: recv()
            # now gives the bytes, then end of stream); then the reset.
            if sys_.recv(s.fd, L.scratch, 1, sys_.MSG_PEEK | sys_.MSG_DONTWAIT) > 0:
                dir_step(L, c, i, now)
                if c.closed:
                    return
            conn_abort(L, c, classify(err))
            return
    if events & (sys_.EPOLLIN | sys_.EPOLLHUP | sys_.EPOLLERR):
        r = dir_step(L, c, i, now)          # side i is readable
    if r == R_OK and events & (sys_.EPOLLOUT | sys_.EPOLLHUP | sys_.EPOLLERR):
        r = dir_step(L, c, 1 - i, now)      # side i is writable
    if r != R_OK:
        conn_abort(L, c, r)
        return
    if c.dir[0].done and c.dir[1].done:
        conn_close(L, c, 0)
        return
    if set_interest(L, c, i, hup) < 0 or set_interest(L, c, 1 - i, 0) < 0:
        conn_abort(L, c, R_ERROR)


cdef void handoff_drop(Loop *L, Handoff *h, int why) noexcept nogil:
    """Reset and close a hand-off that never became a connection, free its
    pending bytes, and count it under *why*. The Handoff itself stays the
    caller's to free."""
    set_linger0(h.cfd)
    set_linger0(h.ufd)
    sys_.close(h.cfd)
    sys_.close(h.ufd)
    free(h.pend_up)
    free(h.pend_down)
    L4_ADD(&L.ctr[C_BUFFERED], -<int64_t>(h.pend_up_len + h.pend_down_len))
    L4_ADD(&L.ctr[why], 1)
    L4_ADD(&L.ctr[C_ACTIVE], -1)
    L4_ADD(&L.ctr[C_CLOSED], 1)
    report_end(L, h.end)
    h.end = NULL


cdef void conn_open(Loop *L, Handoff *h, double now) noexcept nogil:
    """Register a handed-off pair; on any failure the fds are closed here."""
    cdef Conn *c = <Conn *>calloc(1, sizeof(Conn))
    cdef int i, fl
    cdef int on
    cdef int stype = 0
    cdef sys_.socklen_t typelen
    if c == NULL:
        handoff_drop(L, h, C_ERRORS)
        return
    c.side[0].fd = h.cfd
    c.side[1].fd = h.ufd
    c.dir[0].pend = h.pend_up           # ownership moves to the connection
    c.dir[0].pend_len = h.pend_up_len
    c.dir[1].pend = h.pend_down
    c.dir[1].pend_len = h.pend_down_len
    c.end = h.end
    h.end = NULL
    for i in range(2):
        c.side[i].idx = i
        c.side[i].conn = c
        c.dir[i].pipe_r = c.dir[i].pipe_w = -1
        c.dir[i].splice_at = L.threshold if L.max_pipes > 0 else NEVER
    lru_append(L, c)
    c.last_active = now
    for i in range(2):
        # Only stream sockets: anything else (a pipe, a file, UDP) could sit
        # in epoll forever without an event, or fail in ways we do not expect.
        typelen = sizeof(stype)
        if (sys_.getsockopt(c.side[i].fd, sys_.SOL_SOCKET, sys_.SO_TYPE, &stype, &typelen) < 0
                or stype != sys_.SOCK_STREAM):
            conn_abort(L, c, R_ERROR)
            return
        # The caller promised non-blocking sockets; make sure, since one
        # blocking send() would stall every connection of this pump.
        fl = sys_.fcntl(c.side[i].fd, sys_.F_GETFL)
        if fl < 0 or (not (fl & sys_.O_NONBLOCK)
                      and sys_.fcntl(c.side[i].fd, sys_.F_SETFL, fl | sys_.O_NONBLOCK) < 0):
            conn_abort(L, c, R_ERROR)
            return
        # Urgent data (send(MSG_OOB)) is read in its place in the stream:
        # without SO_OOBINLINE recv() skips the urgent byte and it would be
        # lost (we do not re-send it as urgent; the peer gets it as data).
        on = 1
        sys_.setsockopt(c.side[i].fd, sys_.SOL_SOCKET, sys_.SO_OOBINLINE, &on, sizeof(on))
    if set_interest(L, c, 0, 0) < 0 or set_interest(L, c, 1, 0) < 0:
        conn_abort(L, c, R_ERROR)     # e.g. not a socket, or not pollable


cdef void queue_discard(Loop *L, Handoff *h) noexcept nogil:
    """Close the fds of hand-offs that never became connections."""
    cdef Handoff *n
    while h != NULL:
        n = h.next
        handoff_drop(L, h, C_FORCE_CLOSED)
        free(h)
        h = n


cdef void close_all(Loop *L) noexcept nogil:
    """Reset every live connection (drain deadline, or shutdown)."""
    while L.lru_head != NULL:
        L4_ADD(&L.ctr[C_FORCE_CLOSED], 1)
        conn_close(L, L.lru_head, 1)
    bury(L)


cdef void run_loop(Loop *L) noexcept nogil:
    cdef sys_.epoll_event events[<int>MAX_EVENTS]
    cdef int n, k, timeout_ms
    cdef double now, left
    cdef uint64_t junk
    cdef Handoff *h
    cdef Handoff *nxt
    cdef bint stop, force, woken
    cdef Conn *c
    while True:
        if L.lru_head == NULL:
            timeout_ms = -1
        else:
            left = L.lru_head.last_active + L.idle - now_s()
            timeout_ms = 0 if left <= 0 else <int>(min(left, 3600.0) * 1000.0) + 1
        n = sys_.epoll_wait_nc(L.epfd, events, MAX_EVENTS, timeout_ms)
        # Every return counts: a loop that spins (a level-triggered event it
        # cannot act on) shows here, not only as CPU time.
        L4_ADD(&L.ctr[C_WAKEUPS], 1)
        if n < 0:
            n = 0   # EINTR; nothing else can fail on a valid epoll fd
        now = now_s()
        woken = 0
        for k in range(n):
            if events[k].data.ptr == NULL:
                woken = 1
            else:
                on_event(L, <Side *>events[k].data.ptr, events[k].events, now)
        bury(L)
        if woken:
            sys_.read(L.wakefd, &junk, sizeof(junk))
            sys_.pthread_mutex_lock(&L.lock)
            h = L.q_head
            L.q_head = L.q_tail = NULL
            stop = L.stop
            force = L.force
            L.force = 0
            sys_.pthread_mutex_unlock(&L.lock)
            while h != NULL:
                nxt = h.next
                conn_open(L, h, now)
                free(h)
                h = nxt
            if stop or force:
                close_all(L)
            if stop:
                break
        # Idle timeout: the LRU head is the connection that moved a byte least
        # recently. Bytes held for a stuck peer would be lost: reset then.
        while L.lru_head != NULL and L.lru_head.last_active + L.idle <= now:
            c = L.lru_head
            L4_ADD(&L.ctr[C_IDLE], 1)
            conn_close(L, c, c.dir[0].pend_len + c.dir[0].pipe_bytes
                       + c.dir[1].pend_len + c.dir[1].pipe_bytes != 0)
        bury(L)
    # Stopping: nothing may be added any more (accepting was cleared first),
    # so this last sweep of the queue is final.
    sys_.pthread_mutex_lock(&L.lock)
    h = L.q_head
    L.q_head = L.q_tail = NULL
    sys_.pthread_mutex_unlock(&L.lock)
    queue_discard(L, h)
    close_all(L)
    pool_close(L)


# -- the Python face ----------------------------------------------------------

cdef char *copy_bytes(const unsigned char[::1] data) except? NULL:
    cdef char *p
    if data.shape[0] == 0:
        return NULL
    p = <char *>malloc(data.shape[0])
    if p == NULL:
        raise MemoryError()
    memcpy(p, &data[0], data.shape[0])
    return p


cdef void ended_free(Ended *e) noexcept nogil:
    cdef Ended *n
    while e != NULL:
        n = e.next
        free(e)
        e = n


cdef void close_fd_quietly(int fd) noexcept nogil:
    if fd >= 0:
        sys_.close(fd)


cdef class Pump:
    """Relay bytes between pairs of sockets on a background thread (no GIL)."""

    cdef Loop *L
    cdef object _thread
    cdef bint _started
    cdef bint _closed
    cdef readonly double idle_timeout
    cdef readonly Py_ssize_t buffer_size
    cdef readonly Py_ssize_t splice_threshold
    cdef readonly Py_ssize_t max_pipes

    def __cinit__(self, *args, **kwargs):
        self.L = NULL

    def __init__(self, *, double idle_timeout=3600.0, Py_ssize_t buffer_size=65536,
                 Py_ssize_t splice_threshold=262144, Py_ssize_t max_pipes=1024):
        cdef Loop *L
        cdef sys_.epoll_event ev
        if self.L != NULL:
            raise RuntimeError("Pump.__init__ called twice")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout!r}")
        if buffer_size < 1024 or buffer_size > (1 << 30):
            raise ValueError(f"buffer_size must be in [1024, 2**30], got {buffer_size!r}")
        if splice_threshold < 0:
            raise ValueError(f"splice_threshold must be >= 0, got {splice_threshold!r}")
        if max_pipes < 0:
            raise ValueError(f"max_pipes must be >= 0 (0: never splice), got {max_pipes!r}")
        self.idle_timeout = idle_timeout
        self.buffer_size = buffer_size
        self.splice_threshold = splice_threshold
        self.max_pipes = max_pipes
        L = <Loop *>calloc(1, sizeof(Loop))
        if L == NULL:
            raise MemoryError()
        L.epfd = L.wakefd = L.endfd = -1
        L.scratch = <char *>malloc(buffer_size)
        if L.scratch == NULL:
            free(L)
            raise MemoryError()
        sys_.pthread_mutex_init(&L.lock, NULL)
        L.bufsize = buffer_size
        L.threshold = splice_threshold
        L.max_pipes = max_pipes
        L.idle = idle_timeout
        L.accepting = 1
        self.L = L
        L.epfd = sys_.epoll_create1(sys_.EPOLL_CLOEXEC)
        if L.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        L.wakefd = sys_.eventfd(0, sys_.EFD_NONBLOCK | sys_.EFD_CLOEXEC)
        if L.wakefd < 0:
            raise OSError(errno, "eventfd failed")
        L.endfd = sys_.eventfd(0, sys_.EFD_NONBLOCK | sys_.EFD_CLOEXEC)
        if L.endfd < 0:
            raise OSError(errno, "eventfd failed")
        ev.events = sys_.EPOLLIN
        ev.data.ptr = NULL          # NULL marks the wake-up fd
        if sys_.epoll_ctl(L.epfd, sys_.EPOLL_CTL_ADD, L.wakefd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(eventfd) failed")

    def __dealloc__(self):
        # The thread holds a reference to self while it runs, so it is not
        # running here. Anything still queued (never started) is closed.
        cdef Loop *L = self.L
        if L == NULL:
            return
        queue_discard(L, L.q_head)
        L.q_head = L.q_tail = NULL
        close_all(L)
        pool_close(L)
        ended_free(L.ended_head)
        L.ended_head = L.ended_tail = NULL
        close_fd_quietly(L.epfd)
        close_fd_quietly(L.wakefd)
        close_fd_quietly(L.endfd)
        sys_.pthread_mutex_destroy(&L.lock)
        free(L.scratch)
        free(L)
        self.L = NULL

    def _run(self):
        with nogil:
            run_loop(self.L)

    def start(self):
        """Start the relay thread (idempotent). Connections added before
        start() wait in the queue."""
        if self._closed:
            raise RuntimeError("pump is closed")
        if self._started:
            return
        self._thread = threading.Thread(target=self._run, name="l4proxy-pump", daemon=True)
        self._thread.start()
        self._started = 1

    def add(self, int client_fd, int upstream_fd, pending_upstream=b"", pending_client=b"",
            int64_t token=0):
        """Hand two connected non-blocking TCP sockets to the pump.

        The pump owns both fds from here on and closes each exactly once,
        whatever happens (also when this raises). ``pending_upstream`` is
        written upstream before anything read from the client;
        ``pending_client`` likewise toward the client. ``token`` (not 0):
        reported by :meth:`ended` once the connection has ended, unless
        this raises.
        """
        cdef Loop *L = self.L
        cdef Handoff *h = NULL
        if client_fd < 0 or upstream_fd < 0 or client_fd == upstream_fd:
            close_fd_quietly(client_fd)
            if upstream_fd != client_fd:
                close_fd_quietly(upstream_fd)
            raise ValueError(f"need two distinct fds, got {client_fd} and {upstream_fd}")
        try:
            h = <Handoff *>calloc(1, sizeof(Handoff))
            if h == NULL:
                raise MemoryError()
            h.cfd = client_fd
            h.ufd = upstream_fd
            if token != 0:
                h.end = <Ended *>calloc(1, sizeof(Ended))
                if h.end == NULL:
                    raise MemoryError()
                h.end.token = token
            h.pend_up = copy_bytes(pending_upstream)
            h.pend_up_len = len(pending_upstream)
            h.pend_down = copy_bytes(pending_client)
            h.pend_down_len = len(pending_client)
        except BaseException:
            if h != NULL:
                free(h.pend_up)
                free(h.end)
                free(h)
            close_fd_quietly(client_fd)
            close_fd_quietly(upstream_fd)
            raise
        sys_.pthread_mutex_lock(&L.lock)
        if not L.accepting:
            sys_.pthread_mutex_unlock(&L.lock)
            free(h.pend_up)
            free(h.pend_down)
            free(h.end)
            free(h)
            close_fd_quietly(client_fd)
            close_fd_quietly(upstream_fd)
            raise RuntimeError("pump is closed or draining; the sockets were closed")
        if L.q_tail != NULL:
            L.q_tail.next = h
        else:
            L.q_head = h
        L.q_tail = h
        L4_ADD(&L.ctr[C_ACTIVE], 1)
        L4_ADD(&L.ctr[C_ACCEPTED], 1)
        L4_ADD(&L.ctr[C_BUFFERED], <int64_t>(h.pend_up_len + h.pend_down_len))
        sys_.pthread_mutex_unlock(&L.lock)
        wake(L)

    @property
    def active(self):
        """Connections owned: queued or being relayed."""
        return L4_LOAD(&self.L.ctr[C_ACTIVE])

    @property
    def ended_fd(self):
        """An eventfd, readable while :meth:`ended` has tokens to give (-1
        once closed). Watch it; do not read it (:meth:`ended` does)."""
        return self.L.endfd

    def ended(self):
        """The tokens of the connections that ended since the last call, in
        the order they ended (see "Ends reported back"); any thread."""
        return [end[0] for end in self.ends()]

    def ends(self):
        """What :meth:`ended` takes, each end as ``(token, bytes_upstream,
        bytes_downstream, ended)``: the bytes moved client to upstream and
        back, and when it ended (``time.monotonic()``'s clock)."""
        cdef Loop *L = self.L
        cdef uint64_t junk
        cdef Ended *e
        cdef Ended *n
        sys_.pthread_mutex_lock(&L.lock)
        if L.endfd >= 0:  # (under the lock: close() on another thread may close it)
            sys_.read(L.endfd, &junk, sizeof(junk))  # EAGAIN: nothing new
        e = L.ended_head
        L.ended_head = L.ended_tail = NULL
        sys_.pthread_mutex_unlock(&L.lock)
        out = []
        try:
            while e != NULL:
                out.append((e.token, e.up, e.down, e.at))
                n = e.next
                free(e)
                e = n
        finally:
            ended_free(e)  # (only after a MemoryError in append)
        return out

    def stats(self):
        cdef int i
        return {name: L4_LOAD(&self.L.ctr[i]) for i, name in enumerate(_COUNTER_NAMES)}

    def _stop_accepting(self):
        sys_.pthread_mutex_lock(&self.L.lock)
        self.L.accepting = 0
        sys_.pthread_mutex_unlock(&self.L.lock)

    def drain(self, double timeout):
        """Refuse new work; wait up to ``timeout`` s for every connection to
        end; reset what remains. Returns how many were force-closed."""
        cdef Loop *L = self.L
        cdef int64_t before
        cdef Handoff *h
        self._stop_accepting()
        deadline = _time.monotonic() + timeout
        while L4_LOAD(&L.ctr[C_ACTIVE]) > 0 and _time.monotonic() < deadline:
            _time.sleep(0.005)
        if L4_LOAD(&L.ctr[C_ACTIVE]) == 0:
            return 0
        before = L4_LOAD(&L.ctr[C_FORCE_CLOSED])
        if self._started and not self._closed:
            sys_.pthread_mutex_lock(&L.lock)
            L.force = 1
            sys_.pthread_mutex_unlock(&L.lock)
            wake(L)
            # The loop resets everything on its next wake-up (milliseconds);
            # the bound only guards against waiting forever on a bug.
            deadline = _time.monotonic() + 10.0
            while L4_LOAD(&L.ctr[C_ACTIVE]) > 0 and _time.monotonic() < deadline:
                _time.sleep(0.001)
        else:
            # No loop thread: the queue is ours to empty.
            sys_.pthread_mutex_lock(&L.lock)
            h = L.q_head
            L.q_head = L.q_tail = NULL
            sys_.pthread_mutex_unlock(&L.lock)
            queue_discard(L, h)
        return L4_LOAD(&L.ctr[C_FORCE_CLOSED]) - before

    def close(self):
        """Stop the thread, reset every connection still owned, join.
        Idempotent."""
        cdef Loop *L = self.L
        cdef Handoff *h
        cdef int endfd
        if self._closed:
            return
        self._closed = 1
        sys_.pthread_mutex_lock(&L.lock)
        L.accepting = 0
        L.stop = 1
        h = NULL if self._started else L.q_head
        if not self._started:
            L.q_head = L.q_tail = NULL
        sys_.pthread_mutex_unlock(&L.lock)
        if self._started:
            wake(L)
            self._thread.join()
        else:
            queue_discard(L, h)
        close_fd_quietly(L.epfd)
        close_fd_quietly(L.wakefd)
        sys_.pthread_mutex_lock(&L.lock)
        endfd = L.endfd
        L.endfd = -1  # (ended() on another thread reads it under the lock)
        sys_.pthread_mutex_unlock(&L.lock)
        close_fd_quietly(endfd)
        L.epfd = L.wakefd = -1

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

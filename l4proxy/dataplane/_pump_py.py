"""The pump, pure Python: the twin of ``ext/pump.pyx`` with the same semantics.

Theory of operation
===================

A :class:`Pump` owns one daemon thread running its own level-triggered
``select.epoll`` loop. The sidecar's asyncio/uvloop loop never sees a relayed
socket: it hands both fds over with :meth:`Pump.add` and forgets them. The
hand-off goes through a lock-protected queue and an eventfd that wakes the
epoll loop; everything else (connection state, buffers, pipes) belongs to the
loop thread alone.

Ownership of file descriptors
-----------------------------
``add()`` takes both fds. While queued, whoever empties the queue closes them;
once registered, only :meth:`_Loop.close_conn` does, after removing them from
epoll (registrations belong to the open file description: a dup() held
elsewhere would otherwise keep a stale registration alive). A connection
closed in the middle of an epoll batch is dropped from ``_sides``; later
events of that batch for its fds find nothing and are ignored. New connections
are only registered after a batch, so a freed fd number cannot alias.

One connection, two directions
------------------------------
``sides[0]`` is the client, ``sides[1]`` the upstream; ``dirs[d]`` moves bytes
read from ``sides[d]`` to ``sides[1-d]``. Each step of a direction: flush what
it holds (heap buffer or pipe) in order, and read nothing while anything is
held (backpressure: EPOLLIN on the source is dropped, EPOLLOUT on the
destination added); if the source hit EOF, ``shutdown(dst, SHUT_WR)``
(half-close propagated, the other direction keeps flowing); otherwise read and
write straight through, at most ``_STEP_BUDGET`` bytes per wake-up. When both
directions are done both sockets are closed. A reset or error aborts the
connection: SO_LINGER {1, 0} on both, then close, so the surviving peer sees a
RST, not a clean EOF after a truncated stream.

Buffers and splice
------------------
Reads land in one scratch buffer shared by all connections and are sent at
once; only the unsent tail of a partial send is copied into a per-direction
``bytes`` (≤ ``buffer_size``), dropped once it drains, so an idle connection
holds no buffer. After ``splice_threshold`` bytes a direction that holds
nothing switches to ``os.splice`` through a pipe (sized to ``buffer_size``)
from the loop's pool: at most ``max_pipes`` exist, in use or pooled; a pipe
goes back when its direction is done or its connection closes, pooled only
when empty (closed if it still holds bytes). No pipe to be had (``max_pipes``
in use, EMFILE, ENFILE): counted in ``pipe_refusals``, that direction keeps to
recv/send and asks again after another ``_PIPE_RETRY`` bytes.

Urgent data: sockets get SO_OOBINLINE, so the urgent byte of a
send(MSG_OOB) is relayed in its place as plain data (without it recv() would
skip it: a lost byte). splice() cannot cross an urgent mark (tcp_read_sock
stops there: EAGAIN for ever while epoll reports readable, or 0 once the FIN
is queued), so when splice reads nothing and ``sockatmark()`` says the mark
is next, one recv() steps over it. ext/pump.pyx says more.

Ends reported back: ``add(..., token=t)`` with ``t`` != 0 asks to hear of
that connection's end. Once both its sockets are closed (however it ended,
a hand-off discarded unopened included) ``t`` goes on the ended list, which
:meth:`Pump.ended` takes; the ``ended_fd`` eventfd turns readable when the
list stops being empty. The worker's event loop watches it: that is how it
learns that a connection it counts against an endpoint (LEAST_REQUEST) is
gone, and (:meth:`Pump.ends`: the same list, each end with the bytes moved
each way and when it ended, ``time.monotonic()``) what the access log's
line of a connection routed at L4 says. An ``add()`` that raises reports
nothing (the connection never was the pump's). ext/pump.pyx says more.

Kernel notes: no EPOLLRDHUP (EOF shows up as readable + recv() == 0); EPOLLHUP
and EPOLLERR arrive whatever the mask, so a side that hung up and has nothing
for us is removed from epoll instead of spinning; sends use MSG_NOSIGNAL;
splice uses SPLICE_F_MOVE | SPLICE_F_NONBLOCK; EINTR is retried by Python
itself (PEP 475).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import select
import socket
import struct
import threading
import time
from typing import Final

__all__ = ["Pump"]

_EPOLLIN: Final = select.EPOLLIN
_EPOLLOUT: Final = select.EPOLLOUT
_EPOLLERR: Final = select.EPOLLERR
_EPOLLHUP: Final = select.EPOLLHUP
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_SEND_FLAGS: Final = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
_LINGER0: Final = struct.pack("ii", 1, 0)
_STEP_BUDGET: Final = 1 << 20  # bytes per direction per wake-up (fairness)
_PIPE_RETRY: Final = 1 << 20  # after a refused pipe, bytes moved before asking again
_SIOCATMARK: Final = 0x8905  # <asm-generic/sockios.h>; Python has no sockatmark()
_NEVER: Final = 1 << 62

_COUNTER_NAMES: Final = (
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

# Results of one direction step.
_OK: Final = 0
_RESET: Final = 1  # the peer reset (ECONNRESET, EPIPE): abort, count a reset
_ERROR: Final = 2  # anything else: abort, count an error


def _classify(err: int | None) -> int:
    return _RESET if err in (errno.ECONNRESET, errno.EPIPE) else _ERROR


def _at_urgent_mark(fd: int) -> bool:
    """sockatmark(3): is the next byte to read the urgent mark?"""
    (answer,) = struct.unpack("i", fcntl.ioctl(fd, _SIOCATMARK, b"\0\0\0\0"))
    return bool(answer == 1)


class _Dir:
    """One direction of one connection (see the module docstring)."""

    __slots__ = (
        "done",
        "eof",
        "moved",
        "pend",
        "pipe_bytes",
        "pipe_cap",
        "pipe_r",
        "pipe_w",
        "splice_at",
        "splicing",
    )

    def __init__(self, pend: bytes, splice_at: int) -> None:
        self.pend = memoryview(pend) if pend else None  # unsent bytes, owned here
        self.pipe_r = -1
        self.pipe_w = -1
        self.pipe_cap = 0
        self.pipe_bytes = 0
        self.moved = 0
        self.splice_at = splice_at  # bytes moved at which to ask for a pipe (again)
        self.eof = False
        self.done = False
        self.splicing = False

    def held(self) -> int:
        return (len(self.pend) if self.pend is not None else 0) + self.pipe_bytes


class _Side:
    __slots__ = ("conn", "fd", "idx", "in_epoll", "mask", "sock")

    def __init__(self, conn: _Conn, idx: int, sock: socket.socket) -> None:
        self.conn = conn
        self.idx = idx
        self.sock = sock
        self.fd = sock.fileno()
        self.in_epoll = False
        self.mask = 0


class _Conn:
    __slots__ = ("closed", "dirs", "last_active", "sides", "spliced", "token")

    def __init__(self, now: float, token: int) -> None:
        self.sides: list[_Side] = []
        self.dirs: list[_Dir] = []
        self.last_active = now
        self.closed = False
        self.spliced = False
        self.token = token  # reported by Pump.ended() once closed; 0: not


class _Handoff:
    __slots__ = ("cfd", "pend_down", "pend_up", "token", "ufd")

    def __init__(self, cfd: int, ufd: int, pend_up: bytes, pend_down: bytes, token: int) -> None:
        self.cfd = cfd
        self.ufd = ufd
        self.pend_up = pend_up
        self.pend_down = pend_down
        self.token = token


def _close_fd_reset(fd: int) -> None:
    """Close a raw fd we own, with a RST if it is a socket."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    s.close()


class _Loop:
    """All state the relay thread owns.

    Counters: ``x += 1`` on a shared int is a read-modify-write that the GIL
    does not make atomic, so each counter has one writer. ``ctr`` belongs to
    the loop thread (or to the closing thread once no loop runs); ``accepted``
    and ``queued_bytes`` are written only under ``lock`` by :meth:`Pump.add`
    and :meth:`take_queue`. ``active`` is derived: accepted - closed.
    """

    def __init__(self, idle: float, bufsize: int, threshold: int, max_pipes: int) -> None:
        self.idle = idle
        self.bufsize = bufsize
        self.threshold = threshold
        self.max_pipes = max_pipes  # pipes in use + pooled never exceed this
        self.pool: list[tuple[int, int, int]] = []  # empty pipes (r, w, cap) for reuse
        self.scratch = bytearray(bufsize)
        self.view = memoryview(self.scratch)
        self.ep = select.epoll()
        self.wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self.wakefd, _EPOLLIN)
        self.endfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # readable: ended
        self.lock = threading.Lock()
        # guarded by lock
        self.queue: list[_Handoff] = []
        # connections that ended, oldest first: (token, bytes_upstream,
        # bytes_downstream, when: time.monotonic())
        self.ended: list[tuple[int, int, int, float]] = []
        self.accepted = 0
        self.queued_bytes = 0  # pending bytes of queued hand-offs
        self.accepting = True
        self.stop = False
        self.force = False
        # owned by the loop thread; insertion order = LRU by last activity
        self.conns: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        self.sides: dict[int, _Side] = {}
        self.ctr = dict.fromkeys(_COUNTER_NAMES, 0)  # "active", "accepted": unused

    def active(self) -> int:
        closed = self.ctr["closed"]  # read first: closed <= accepted, always
        return self.accepted - closed

    def take_queue(self) -> tuple[list[_Handoff], bool, bool]:
        """Empty the hand-off queue; also return (stop, force), clearing force."""
        with self.lock:
            queue, self.queue = self.queue, []
            self.queued_bytes -= sum(len(h.pend_up) + len(h.pend_down) for h in queue)
            stop, force = self.stop, self.force
            self.force = False
        return queue, stop, force

    def stats(self) -> dict[str, int]:
        out = dict(self.ctr)
        with self.lock:
            out["accepted"] = self.accepted
            out["buffered"] += self.queued_bytes
        out["active"] = out["accepted"] - out["closed"]
        return out

    def report_end(self, token: int, up: int = 0, down: int = 0) -> None:
        """A connection added with *token* has ended, having moved *up*
        bytes to the upstream and *down* back (see "Ends reported back");
        the eventfd is written when the list was empty."""
        if not token:
            return
        end = (token, up, down, time.monotonic())
        with self.lock:
            was_empty = not self.ended
            self.ended.append(end)
        if was_empty and self.endfd >= 0:
            try:
                os.eventfd_write(self.endfd, 1)
            except OSError:
                pass  # EAGAIN: saturated, readable anyway

    def wake(self) -> None:
        try:
            os.eventfd_write(self.wakefd, 1)
        except OSError:
            pass  # EAGAIN: counter saturated, the loop is awake anyway; EBADF: closed

    # -- lifetime ----------------------------------------------------------

    def touch(self, c: _Conn, now: float) -> None:
        c.last_active = now
        self.conns.move_to_end(id(c))

    def close_conn(self, c: _Conn, reset: bool) -> None:
        if c.closed:
            return
        c.closed = True
        # out of the idle order first: should a close below raise, the idle
        # sweep must not meet this connection again (it would spin on it)
        self.conns.pop(id(c), None)
        try:
            for s in c.sides:
                if s.in_epoll:
                    self.ep.unregister(s.fd)
                    s.in_epoll = False
                self.sides.pop(s.fd, None)
                if reset:
                    try:
                        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                    except OSError:
                        pass
                s.sock.close()
            for x in c.dirs:
                self.ctr["buffered"] -= x.held()
                x.pend = None
                self.pipe_put(x)  # pooled if empty, closed if it still holds bytes
                x.pipe_bytes = 0
            self.ctr["closed"] += 1
        finally:
            # whatever raised above, the end is reported (once: c.closed):
            # the worker's LEAST_REQUEST count would keep it for good otherwise
            if c.dirs:
                self.report_end(c.token, c.dirs[0].moved, c.dirs[1].moved)
            else:
                self.report_end(c.token)

    def abort(self, c: _Conn, why: int) -> None:
        self.ctr["resets" if why == _RESET else "errors"] += 1
        self.close_conn(c, True)

    def set_interest(self, c: _Conn, i: int, hup: bool) -> None:
        s = c.sides[i]
        rd = c.dirs[i]  # reads from side i
        wr = c.dirs[1 - i]  # writes to side i
        want = 0
        if not rd.eof and rd.pend is None and rd.pipe_bytes == 0:
            want |= _EPOLLIN
        if wr.pend is not None or wr.pipe_bytes:
            want |= _EPOLLOUT
        if want == 0 and (hup or not s.in_epoll):
            # EPOLLHUP ignores the mask and is level-triggered: stop watching
            # a hung-up side we have nothing for, or the loop would spin.
            if s.in_epoll:
                self.ep.unregister(s.fd)
                s.in_epoll = False
            return
        if s.in_epoll and want == s.mask:
            return
        if s.in_epoll:
            self.ep.modify(s.fd, want)
        else:
            self.ep.register(s.fd, want)
            s.in_epoll = True
        s.mask = want

    def open_pipe(self, x: _Dir) -> bool:
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.bufsize)
        except OSError:
            pass  # keep the default size; we ask what we got below
        x.pipe_cap = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        x.pipe_r, x.pipe_w = r, w
        return True

    def pipe_get(self, x: _Dir) -> bool:
        """A pooled pipe, else a new one while fewer than max_pipes exist.
        False when refused (counted): the caller stays on recv/send and asks
        again later, since fds come back as connections close."""
        if self.pool:
            x.pipe_r, x.pipe_w, x.pipe_cap = self.pool.pop()
            self.ctr["pipes_free"] -= 1
            self.ctr["pipes_used"] += 1
            return True
        # The pool is empty: every pipe that exists is in use. pipe2() fails
        # with EMFILE/ENFILE (or ENOMEM) when the fds are gone.
        if self.ctr["pipes_used"] < self.max_pipes and self.open_pipe(x):
            self.ctr["pipes_used"] += 1
            return True
        self.ctr["pipe_refusals"] += 1
        return False

    def pipe_put(self, x: _Dir) -> None:
        """Take back x's pipe: only an empty one is pooled (pipe_bytes is
        exact); one with bytes of a dying connection is closed, so no byte can
        leak into another connection."""
        if x.pipe_r < 0:
            return
        if x.pipe_bytes == 0:
            self.pool.append((x.pipe_r, x.pipe_w, x.pipe_cap))
            self.ctr["pipes_free"] += 1
        else:
            os.close(x.pipe_r)
            os.close(x.pipe_w)
        self.ctr["pipes_used"] -= 1
        x.pipe_r = x.pipe_w = -1
        x.splicing = False

    def pool_close(self) -> None:
        while self.pool:
            r, w, _ = self.pool.pop()
            os.close(r)
            os.close(w)
            self.ctr["pipes_free"] -= 1

    def moved(self, c: _Conn, d: int, n: int, now: float) -> None:
        c.dirs[d].moved += n
        self.ctr["bytes_upstream" if d == 0 else "bytes_downstream"] += n
        self.touch(c, now)

    # -- the relay -----------------------------------------------------------

    def step(self, c: _Conn, d: int, now: float) -> int:
        """Move bytes for direction d until it would block."""
        x = c.dirs[d]
        if x.done:
            return _OK
        src = c.sides[d].sock
        dst = c.sides[1 - d].sock
        budget = _STEP_BUDGET
        drained = False
        spliced = False  # splice() read something in this call
        try:
            while True:
                if x.pend is not None:
                    n = dst.send(x.pend, _SEND_FLAGS)
                    self.ctr["buffered"] -= n
                    self.moved(c, d, n, now)
                    if n < len(x.pend):
                        x.pend = x.pend[n:]
                        return _OK
                    x.pend = None
                if x.pipe_bytes:
                    n = os.splice(x.pipe_r, dst.fileno(), x.pipe_bytes, flags=_SPLICE_FLAGS)
                    x.pipe_bytes -= n
                    self.ctr["buffered"] -= n
                    self.moved(c, d, n, now)
                    if x.pipe_bytes:
                        return _OK
                if x.eof:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # ENOTCONN: the peer is gone; its next event says how
                    x.done = True
                    self.pipe_put(x)  # empty now: back to the pool, for others
                    self.touch(c, now)
                    return _OK
                if drained or budget <= 0:
                    return _OK
                if not x.splicing and x.moved >= x.splice_at:
                    if self.pipe_get(x):
                        x.splicing = True
                        if not c.spliced:
                            c.spliced = True
                            self.ctr["spliced"] += 1
                    else:
                        # No pipe now: this stretch goes through recv/send.
                        x.splice_at = x.moved + _PIPE_RETRY
                if x.splicing:
                    try:
                        n = os.splice(src.fileno(), x.pipe_w, x.pipe_cap, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = -1
                    if n > 0:
                        spliced = True
                        x.pipe_bytes = n
                        self.ctr["buffered"] += n
                        budget -= n
                        continue
                    # EAGAIN and 0 (EOF) may both be false: splice stops at an
                    # urgent mark (tcp_read_sock), EAGAIN for ever while epoll
                    # reports the bytes behind it, 0 once the FIN is queued.
                    # Only recv() reads past the mark (see ext/pump.pyx); the
                    # pipe is empty here, so order is kept.
                    if (n < 0 and spliced) or not _at_urgent_mark(src.fileno()):
                        if n == 0:
                            x.eof = True
                            continue
                        return _OK
                    self.ctr["urgent"] += 1
                n = src.recv_into(self.view, self.bufsize)
                if n == 0:
                    x.eof = True
                    continue
                try:
                    m = dst.send(self.view[:n], _SEND_FLAGS)
                except BlockingIOError:
                    m = 0
                if m:
                    self.moved(c, d, m, now)
                if m < n:
                    # The scratch buffer is shared: copy the unsent tail.
                    x.pend = memoryview(bytes(self.view[m:n]))
                    self.ctr["buffered"] += n - m
                    return _OK
                drained = n < self.bufsize
                budget -= n
        except BlockingIOError:
            return _OK
        except OSError as exc:
            return _classify(exc.errno)

    def on_event(self, s: _Side, events: int, now: float) -> None:
        c = s.conn
        i = s.idx
        if events & _EPOLLERR:
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                # What the peer sent before its reset goes on first, as a
                # direct connection would deliver it (the error is read:
                # recv() now gives the bytes, then end of stream); then the reset.
                try:
                    queued = bool(s.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
                except OSError:
                    queued = False
                if queued:
                    self.step(c, i, now)
                    if c.closed:
                        return
                self.abort(c, _classify(err))
                return
        r = _OK
        if events & (_EPOLLIN | _EPOLLHUP | _EPOLLERR):
            r = self.step(c, i, now)
        if r == _OK and events & (_EPOLLOUT | _EPOLLHUP | _EPOLLERR):
            r = self.step(c, 1 - i, now)
        if r != _OK:
            self.abort(c, r)
            return
        if c.dirs[0].done and c.dirs[1].done:
            self.close_conn(c, False)
            return
        self.set_interest(c, i, bool(events & _EPOLLHUP))
        self.set_interest(c, 1 - i, False)

    def open_conn(self, h: _Handoff, now: float) -> None:
        c = _Conn(now, h.token)
        socks: list[socket.socket] = []
        try:
            for fd in (h.cfd, h.ufd):
                sock = socket.socket(fileno=fd)
                socks.append(sock)
                # Only stream sockets: anything else could sit in epoll
                # forever without an event, or fail in ways we do not expect.
                if sock.type != socket.SOCK_STREAM:
                    raise OSError(errno.ENOTSOCK, "not a stream socket")
                # One blocking send would stall every connection of the pump.
                sock.setblocking(False)
                # Urgent data is read in its place in the stream: without
                # SO_OOBINLINE recv() skips (loses) the urgent byte.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        except BaseException as exc:
            # Not a socket (ENOTSOCK), or worse: close each fd exactly once,
            # through its socket object where one took ownership; the end is
            # reported whatever raised (what is not an OSError still raises).
            for sock in socks:
                _close_fd_reset(sock.detach())
            for fd in (h.cfd, h.ufd)[len(socks) :]:
                _close_fd_reset(fd)
            self.ctr["errors"] += 1
            self.ctr["closed"] += 1
            self.report_end(h.token)
            if not isinstance(exc, OSError):
                raise
            return
        c.sides = [_Side(c, 0, socks[0]), _Side(c, 1, socks[1])]
        splice_at = self.threshold if self.max_pipes > 0 else _NEVER
        c.dirs = [_Dir(h.pend_up, splice_at), _Dir(h.pend_down, splice_at)]
        self.ctr["buffered"] += len(h.pend_up) + len(h.pend_down)
        self.conns[id(c)] = c
        for s in c.sides:
            self.sides[s.fd] = s
        try:
            self.set_interest(c, 0, False)
            self.set_interest(c, 1, False)
        except OSError:
            self.abort(c, _ERROR)

    def close_all(self) -> None:
        for c in list(self.conns.values()):
            self.ctr["force_closed"] += 1
            self.close_conn(c, True)

    def discard(self, queue: list[_Handoff]) -> None:
        for h in queue:
            _close_fd_reset(h.cfd)
            _close_fd_reset(h.ufd)
            self.ctr["force_closed"] += 1
            self.ctr["closed"] += 1
            self.report_end(h.token)

    def run(self) -> None:
        while True:
            try:
                if self.run_once():
                    break
            except Exception:  # the thread must not die; see below
                # A bug in the loop itself (not a connection's I/O error, which
                # step() turns into a result). Count it and keep relaying.
                self.ctr["errors"] += 1
        self.discard(self.take_queue()[0])
        self.close_all()
        self.pool_close()

    def run_once(self) -> bool:
        """One epoll batch; True when asked to stop."""
        if self.conns:
            oldest = next(iter(self.conns.values()))
            timeout = max(0.0, oldest.last_active + self.idle - time.monotonic())
            timeout = min(timeout, 3600.0) + 0.001
        else:
            timeout = -1
        events = self.ep.poll(timeout, 256)
        self.ctr["wakeups"] += 1  # every return: a spinning loop shows here
        now = time.monotonic()
        woken = False
        for fd, ev in events:
            if fd == self.wakefd:
                woken = True
                continue
            s = self.sides.get(fd)
            if s is None or s.conn.closed:
                continue  # closed earlier in this batch
            try:
                self.on_event(s, ev, now)
            except Exception:  # one failing connection, not the loop
                self.abort(s.conn, _ERROR)
        if woken:
            try:
                os.eventfd_read(self.wakefd)
            except BlockingIOError:
                pass
            queue, stop, force = self.take_queue()
            for h in queue:
                self.open_conn(h, now)
            if stop or force:
                self.close_all()
            if stop:
                return True
        # Idle timeout, oldest first. Bytes held for a stuck peer would be
        # lost: reset then, plain close otherwise.
        while self.conns:
            c = next(iter(self.conns.values()))
            if c.last_active + self.idle > now:
                break
            self.ctr["idle_timeouts"] += 1
            self.close_conn(c, c.dirs[0].held() + c.dirs[1].held() != 0)
        return False


class Pump:
    """Relay bytes between pairs of sockets on a background thread."""

    def __init__(
        self,
        *,
        idle_timeout: float = 3600.0,
        buffer_size: int = 65536,
        splice_threshold: int = 262144,
        max_pipes: int = 1024,
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout!r}")
        if not 1024 <= buffer_size <= 1 << 30:
            raise ValueError(f"buffer_size must be in [1024, 2**30], got {buffer_size!r}")
        if splice_threshold < 0:
            raise ValueError(f"splice_threshold must be >= 0, got {splice_threshold!r}")
        if max_pipes < 0:
            raise ValueError(f"max_pipes must be >= 0 (0: never splice), got {max_pipes!r}")
        self.idle_timeout = float(idle_timeout)
        self.buffer_size = buffer_size
        self.splice_threshold = splice_threshold
        self.max_pipes = max_pipes
        self._loop = _Loop(self.idle_timeout, buffer_size, splice_threshold, max_pipes)
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Start the relay thread (idempotent). Connections added before
        start() wait in the queue."""
        if self._closed:
            raise RuntimeError("pump is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop.run, name="l4proxy-pump-py", daemon=True
            )
            self._thread.start()

    def add(
        self,
        client_fd: int,
        upstream_fd: int,
        pending_upstream: bytes = b"",
        pending_client: bytes = b"",
        token: int = 0,
    ) -> None:
        """Hand two connected non-blocking TCP sockets to the pump.

        The pump owns both fds from here on and closes each exactly once,
        whatever happens (also when this raises). ``pending_upstream`` is
        written upstream before anything read from the client;
        ``pending_client`` likewise toward the client. ``token`` (not 0):
        reported by :meth:`ended` once the connection has ended, unless
        this raises.
        """
        if client_fd < 0 or upstream_fd < 0 or client_fd == upstream_fd:
            for fd in {client_fd, upstream_fd}:
                if fd >= 0:
                    os.close(fd)
            raise ValueError(f"need two distinct fds, got {client_fd} and {upstream_fd}")
        lp = self._loop
        try:
            h = _Handoff(
                client_fd, upstream_fd, bytes(pending_upstream), bytes(pending_client), int(token)
            )
        except BaseException:  # not bytes-like: the fds are still ours to close
            os.close(client_fd)
            os.close(upstream_fd)
            raise
        with lp.lock:
            ok = lp.accepting
            if ok:
                lp.queue.append(h)
                lp.accepted += 1
                lp.queued_bytes += len(h.pend_up) + len(h.pend_down)
        if not ok:
            os.close(client_fd)
            os.close(upstream_fd)
            raise RuntimeError("pump is closed or draining; the sockets were closed")
        lp.wake()

    @property
    def active(self) -> int:
        """Connections owned: queued or being relayed."""
        return self._loop.active()

    @property
    def ended_fd(self) -> int:
        """An eventfd, readable while :meth:`ended` has tokens to give (-1
        once closed). Watch it; do not read it (:meth:`ended` does)."""
        return self._loop.endfd

    def ended(self) -> list[int]:
        """The tokens of the connections that ended since the last call, in
        the order they ended (see "Ends reported back"); any thread."""
        return [end[0] for end in self.ends()]

    def ends(self) -> list[tuple[int, int, int, float]]:
        """What :meth:`ended` takes, each end as ``(token, bytes_upstream,
        bytes_downstream, ended)``: the bytes moved client to upstream and
        back, and when it ended (``time.monotonic()``)."""
        lp = self._loop
        if lp.endfd >= 0:
            try:
                os.eventfd_read(lp.endfd)
            except OSError:
                pass  # EAGAIN: nothing new; EBADF: closed meanwhile
        with lp.lock:
            out, lp.ended = lp.ended, []
        return out

    def stats(self) -> dict[str, int]:
        return self._loop.stats()

    def drain(self, timeout: float) -> int:
        """Refuse new work; wait up to ``timeout`` s for every connection to
        end; reset what remains. Returns how many were force-closed."""
        lp = self._loop
        with lp.lock:
            lp.accepting = False
        deadline = time.monotonic() + timeout
        while lp.active() > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        if lp.active() == 0:
            return 0
        before = lp.ctr["force_closed"]
        if self._thread is not None and not self._closed:
            with lp.lock:
                lp.force = True
            lp.wake()
            deadline = time.monotonic() + 10.0  # guards against a bug, not a wait
            while lp.active() > 0 and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            lp.discard(lp.take_queue()[0])  # no loop thread: the queue is ours
        return lp.ctr["force_closed"] - before

    def close(self) -> None:
        """Stop the thread, reset every connection still owned, join.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        lp = self._loop
        with lp.lock:
            lp.accepting = False
            lp.stop = True
        if self._thread is not None:
            lp.wake()
            self._thread.join()
        else:
            lp.discard(lp.take_queue()[0])
        lp.ep.close()
        os.close(lp.wakefd)
        os.close(lp.endfd)
        lp.endfd = -1

    def __enter__(self) -> Pump:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The control channel between the supervisor and one worker: both ends.

Theory of operation
-------------------
Each worker inherits one end of a ``socketpair()`` (``--control-fd``); the
supervisor keeps the other. The supervisor asks (``ready``, ``state``,
``stats``, ``config_dump``, ``clusters``, ``logging``, ``healthcheck``), the
worker answers: the heavy ones (:data:`HEAVY_OPS`) in turn, in a lane of
their own, the others as soon as they are read (:func:`serve_supervisor`).
Both ends live here so that the wire format has exactly one definition
(of the frames: what a ``stats`` answer carries is ``_stats_wire``'s).

Wire format: every message is one frame::

    +----------------+----------------+---------------------------+
    | length: u32 BE | request id: u32 BE | payload: UTF-8 JSON      |
    +----------------+----------------+---------------------------+

``length`` counts the payload only. A request's payload is ``{"op": NAME}``
(an op that takes an argument carries it after one space: ``logging
l4proxy.worker=debug``, loglevels; ``healthcheck fail``, ``healthcheck ok``);
an answer carries the id of its request and ``{"ok": VALUE}`` or
``{"error": TEXT}``. Ids start at 1 and wrap; 0 is never used, so a frame
of zeros is refused rather than taken for an answer.

Why frames and ids (issue 12): the first channel was one JSON line each way
with a 3 s timeout and no ids. An answer over 64 KiB overflowed the reader
and left its tail in the stream; an answer that came after the timeout
stayed queued, and every later request read the answer to the one before
(``/config_dump`` served the ``/stats`` payload, for good). With a length
prefix the stream can never be read out of step, and with ids an answer is
matched to the request that asked for it: a late answer (the worker was
stopped, or busy with its first rule load) is recognised and dropped.

What happens on a failure, and why:

* **timeout**: the request is abandoned (its id forgotten) and the caller
  gets ``None``. The channel is *not* reset and the worker is *not* killed:
  framing keeps the stream in step, so the late answer is harmless, and a
  worker that is merely slow (a big first load, a long GC pause) must not be
  restarted by an admin query. Deciding that a worker is hung is the
  supervisor's watchdog's job, with its own, longer limit.
* **framing or parse error** (a length over the bound, a zero id, payload
  that is not JSON or not the expected shape): the byte stream can no longer
  be trusted, and nothing on it can be resynchronised. The supervisor's end
  closes, every pending request gets ``None``, and ``on_broken`` is called:
  the supervisor then **replaces the worker** (kills it; the slot's keeper
  starts another with a fresh socketpair). Replacing rather than resetting
  the channel: a channel can only be reset by handing the live worker a new
  socket, and a worker whose end wrote garbage is itself not to be trusted.
* **size**: a frame may be up to :data:`MAX_ANSWER` (64 MiB: a
  ``/config_dump`` of 100,000 endpoints is ~20 MB) from the worker, and
  :data:`MAX_REQUEST` (64 KiB) from the supervisor. The length is checked
  when the 8-byte header is read, before any payload is buffered, so a broken
  peer cannot make either side allocate more than that. A worker whose answer
  would not fit sends an error answer instead (and is not replaced).

The core (:func:`encode`, :class:`FrameDecoder`, :class:`RequestBook`) does
no I/O and is tested table-driven, whole and one byte at a time; the thin
asyncio shells are :class:`SupervisorEnd` and :func:`serve_supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("l4proxy.workerlink")

HEADER = struct.Struct(">II")  # payload length, request id
MAX_ANSWER = 64 << 20
MAX_REQUEST = 64 << 10
MAX_ID = 0xFFFFFFFF
READ_CHUNK = 256 << 10


class ChannelError(Exception):
    """The peer sent bytes that are not a well-formed frame or message."""


@dataclass(frozen=True)
class Frame:
    id: int
    payload: bytes


def encode(request_id: int, message: Any, limit: int = MAX_ANSWER) -> bytes:
    """One frame; ValueError if the id is out of range or the payload over *limit*."""
    if not 0 < request_id <= MAX_ID:
        raise ValueError(f"request id {request_id} out of range 1..{MAX_ID}")
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) > limit:
        raise ValueError(f"message of {len(payload)} bytes is over the {limit}-byte bound")
    return HEADER.pack(len(payload), request_id) + payload


class FrameDecoder:
    """Bytes in, whole frames out; raises :class:`ChannelError` on a bad header.

    Buffers at most one frame (bounded by *limit*) plus one read's worth.
    After an error the decoder stays broken: the stream cannot be resynced.
    """

    def __init__(self, limit: int = MAX_ANSWER) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._error: ChannelError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error:
            raise self._error
        self._buf += data
        frames: list[Frame] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER.size:
            length, request_id = HEADER.unpack_from(buf, pos)
            if length > self.limit:
                self._error = ChannelError(
                    f"frame of {length} bytes announced, over the {self.limit}-byte bound"
                )
            elif request_id == 0:
                self._error = ChannelError("frame with request id 0")
            if self._error:
                del buf[:]
                raise self._error
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            with memoryview(buf) as view:  # (one copy of the payload, not two)
                frames.append(Frame(request_id, bytes(view[pos + HEADER.size : end])))
            pos = end
        del buf[:pos]
        return frames


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ChannelError(f"payload is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ChannelError(f"payload is a JSON {type(msg).__name__}, expected an object")
    return msg


def decode_request(frame: Frame) -> str:
    """The op a request frame asks for (the worker's side)."""
    op = _json_object(frame.payload).get("op")
    if not isinstance(op, str):
        raise ChannelError(f"request {frame.id} has no string 'op'")
    return op


@dataclass(frozen=True)
class Answer:
    id: int
    op: str
    ok: bool
    value: Any  # the answer when ok, else the worker's error text


class RequestBook:
    """The supervisor's open requests: hands out ids, matches answers to them.

    ``answer()`` returns None for a frame whose id is not open (the answer to
    a request that timed out, or an id never handed out): it is dropped and
    counted in :attr:`stale`.
    """

    def __init__(self) -> None:
        self._next = 1
        self._open: dict[int, str] = {}
        self.stale = 0

    def __len__(self) -> int:
        return len(self._open)

    def request(self, op: str) -> tuple[int, bytes]:
        request_id = self._next
        while request_id in self._open:  # wrapped onto one still open (4e9 later)
            request_id = request_id % MAX_ID + 1
        self._next = request_id % MAX_ID + 1
        self._open[request_id] = op
        return request_id, encode(request_id, {"op": op}, MAX_REQUEST)

    def abandon(self, request_id: int) -> None:
        self._open.pop(request_id, None)

    def abandon_all(self) -> list[int]:
        ids = list(self._open)
        self._open.clear()
        return ids

    def answer(self, frame: Frame) -> Answer | None:
        msg = _json_object(frame.payload)  # parsed even when stale: garbage is garbage
        if len(msg) != 1 or not ("ok" in msg or "error" in msg):
            raise ChannelError(f"answer {frame.id} is neither {{'ok': ...}} nor {{'error': ...}}")
        op = self._open.pop(frame.id, None)
        if op is None:
            self.stale += 1
            return None
        if "ok" in msg:
            return Answer(frame.id, op, True, msg["ok"])
        return Answer(frame.id, op, False, str(msg["error"]))


def encode_answer(request_id: int, value: Any, limit: int = MAX_ANSWER) -> bytes:
    """The worker's answer frame; an error answer when *value* would not fit."""
    try:
        return encode(request_id, {"ok": value}, limit)
    except ValueError as exc:
        return encode(request_id, {"error": str(exc)}, limit)


def encode_error(request_id: int, text: str) -> bytes:
    return encode(request_id, {"error": text[:1000]})


# -- asyncio shells ------------------------------------------------------------


class SupervisorEnd:
    """The supervisor's end of one worker's channel.

    Requests may overlap (the admin and the watchdog ask at once); a reader
    task hands each answer to the request with its id. ``on_broken(reason)``
    is called once, from the reader task, when the worker sent something that
    is not a frame; the end is closed by then.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_broken: Callable[[str], None],
        limit: int = MAX_ANSWER,
    ) -> None:
        self._sock = sock
        self._on_broken = on_broken
        self._decoder = FrameDecoder(limit)
        self._book = RequestBook()
        self._waiting: dict[int, asyncio.Future[Answer | None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = False
        self.broken: str | None = None

    @property
    def stale(self) -> int:
        """Answers that came after their request had timed out (dropped)."""
        return self._book.stale

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def ask(self, op: str, timeout: float | None) -> Any:
        """The worker's answer to *op*, or None (no answer in time, an error, closed).

        *timeout* None: no limit; the answer or the end's close ends the wait."""
        if self.closed or self._writer is None:
            return None
        return await self._answer(op, self._send(op), timeout)

    def tell(self, op: str) -> asyncio.Future[Any]:
        """:meth:`ask` *op*, its request written before this returns (a
        signal sent to the worker next comes after it on the stream: the
        supervisor's ``stopping`` before its SIGTERM); the task ends with
        the answer, or None once the end closes. Keep a reference to it."""
        loop = asyncio.get_running_loop()
        if self.closed or self._writer is None:
            done: asyncio.Future[Any] = loop.create_future()
            done.set_result(None)
            return done
        return loop.create_task(self._answer(op, self._send(op), None))

    def _send(self, op: str) -> tuple[int, asyncio.Future[Answer | None]]:
        assert self._writer is not None
        request_id, frame = self._book.request(op)
        fut: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        try:
            self._writer.write(frame)
        except (OSError, ConnectionError):
            fut.set_result(None)
        return request_id, fut

    async def _answer(
        self, op: str, sent: tuple[int, asyncio.Future[Answer | None]], timeout: float | None
    ) -> Any:
        request_id, fut = sent
        assert self._writer is not None
        try:
            async with asyncio.timeout(timeout):
                await self._writer.drain()
                answer = await fut
        except (TimeoutError, OSError, ConnectionError):
            self._book.abandon(request_id)
            return None
        finally:
            self._waiting.pop(request_id, None)
        if answer is None:
            return None
        if not answer.ok:
            log.warning("worker could not answer %r: %s", op, answer.value)
            return None
        return answer.value

    def _take(self, data: bytes) -> None:
        """Hand the answers *data* completes to their requests. (A method
        of its own: no frame outlives it, where the last one, a /stats
        answer of hundreds of KB, stayed referenced until the next read.)"""
        for frame in self._decoder.feed(data):
            answer = self._book.answer(frame)
            if answer is None:
                continue
            fut = self._waiting.get(answer.id)
            if fut is not None and not fut.done():
                fut.set_result(answer)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._book.abandon_all()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(None)
        self._waiting.clear()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while not self.closed:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break  # the worker exited; its keeper sees to the rest
                self._take(data)
        except asyncio.CancelledError:
            raise
        except (OSError, ConnectionError):
            pass
        except Exception as exc:  # ChannelError, or a bug here: the stream is lost
            self.broken = str(exc) if isinstance(exc, ChannelError) else repr(exc)
            self.close()
            try:
                self._on_broken(self.broken)
            except Exception:
                log.exception("control channel: on_broken failed")
            return
        self.close()


# The requests whose answers are big and built on the worker's event loop
# (its counters, its route table): answered in turn, in a lane of their own.
HEAVY_OPS = frozenset({"stats", "config_dump", "clusters"})
# The requests answered when something happens, not when read: each in a
# task of its own, holding up nothing (``leaving``: the supervisor asks it
# of each worker as it starts; answered when the worker is sent a SIGTERM;
# ``final``: asked of one that drains on a SIGTERM of its own, answered
# with its last counts as it exits; run._answer_supervisor).
WAITING_OPS = frozenset({"leaving", "final"})


async def serve_supervisor(
    sock: socket.socket,
    handle: Callable[[str], Awaitable[Any]],
    limit: int = MAX_REQUEST,
    written: Callable[[str], None] | None = None,
) -> str:
    """The worker's end: answer each request with ``await handle(op)``.

    The requests of :data:`HEAVY_OPS` are answered in turn, in a lane of
    their own; any other (``ready``, ``state``, ``logging``,
    ``healthcheck``) as soon as it is read, whatever is in that lane: a
    /ready waited for the scrape before it (0.9 to 2.8 s of a 444-series
    /stats: the kubelet's 1 s probes failed), and the watchdog's ping
    could wait for a queue of /config_dump answers. Each answer is written
    whole, as one frame, so the two lanes' answers never interleave; the
    supervisor matches them to its requests by their ids.

    *written(op)*, where given, is called once an answer to *op* was
    written and drained (handed to the kernel: the supervisor reads it even
    if this process exits next; run._Leaving.finish).

    Returns why it stopped (the supervisor closed its end, or sent something
    that is not a request). A handler that raises gets an error answer and
    the loop goes on: one failing ``/clusters`` must not silence the worker,
    or the watchdog would take it for hung.
    """
    reader, writer = await asyncio.open_connection(sock=sock)
    decoder = FrameDecoder(limit)
    heavy: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    async def answer(request_id: int, op: str) -> None:
        try:
            out = encode_answer(request_id, await handle(op))
        except Exception as exc:
            log.exception("control request %r failed", op)
            out = encode_error(request_id, f"{type(exc).__name__}: {exc}")
        writer.write(out)
        await writer.drain()
        if written is not None:
            written(op)

    async def heavy_lane() -> None:
        try:
            while True:
                request_id, op = await heavy.get()
                await answer(request_id, op)
        except (OSError, ConnectionError):
            writer.close()  # (the reader reads the end of the stream then)

    lane = asyncio.get_running_loop().create_task(heavy_lane())
    waiting: set[asyncio.Task[None]] = set()

    async def answer_when_due(request_id: int, op: str) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            await answer(request_id, op)

    try:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                return "supervisor gone"
            try:
                frames = decoder.feed(data)
            except ChannelError as exc:
                return f"bad frame from the supervisor: {exc}"
            for frame in frames:
                try:
                    op = decode_request(frame)
                except ChannelError as exc:
                    return f"bad request from the supervisor: {exc}"
                if op.partition(" ")[0] in HEAVY_OPS:
                    heavy.put_nowait((frame.id, op))
                elif op in WAITING_OPS:
                    task = asyncio.get_running_loop().create_task(answer_when_due(frame.id, op))
                    waiting.add(task)
                    task.add_done_callback(waiting.discard)
                else:
                    await answer(frame.id, op)
    except (OSError, ConnectionError) as exc:
        return f"control socket error: {exc}"
    finally:
        lane.cancel()
        for task in list(waiting):
            task.cancel()
        writer.close()

"""The supervisor-worker channel (l4proxy.sidecar.channel).

The sans-IO core table-driven, whole and one byte at a time, plus a seeded
fuzz invariant; then both asyncio ends against each other over a real
socketpair (issue 12: answers over 64 KiB, late answers, garbage).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from l4proxy.sidecar.channel import (
    HEADER,
    MAX_ANSWER,
    MAX_ID,
    ChannelError,
    Frame,
    FrameDecoder,
    RequestBook,
    SupervisorEnd,
    decode_request,
    encode,
    encode_answer,
    serve_supervisor,
)


def frame(request_id: int, payload: bytes) -> bytes:
    return struct.pack(">II", len(payload), request_id) + payload


def feed_whole(data: bytes, limit: int = MAX_ANSWER) -> list[Frame]:
    return FrameDecoder(limit).feed(data)


def feed_bytewise(data: bytes, limit: int = MAX_ANSWER) -> list[Frame]:
    dec = FrameDecoder(limit)
    out: list[Frame] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    return out


FEEDERS = [feed_whole, feed_bytewise]

GOOD: list[tuple[str, bytes, list[Frame]]] = [
    ("empty", b"", []),
    ("one", frame(1, b'{"op":"ready"}'), [Frame(1, b'{"op":"ready"}')]),
    ("empty payload", frame(7, b""), [Frame(7, b"")]),
    (
        "two in one read",
        frame(1, b"{}") + frame(2, b"[]"),
        [Frame(1, b"{}"), Frame(2, b"[]")],
    ),
    ("max id", frame(MAX_ID, b"1"), [Frame(MAX_ID, b"1")]),
    ("header only: incomplete", frame(3, b"abc")[: HEADER.size], []),
    ("payload incomplete", frame(3, b"abcdef")[:-1], []),
    ("at the bound", frame(4, b"x" * 100), [Frame(4, b"x" * 100)]),
]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("name,data,expected", GOOD, ids=[g[0] for g in GOOD])
def test_frames_decode(feed: Any, name: str, data: bytes, expected: list[Frame]) -> None:
    assert feed(data, 100) == expected


BAD: list[tuple[str, bytes, str]] = [
    ("over the bound", frame(1, b"x" * 101), "over the 100-byte bound"),
    ("4 GiB announced", struct.pack(">II", 0xFFFFFFFF, 1), "over the 100-byte bound"),
    ("id zero", frame(0, b"{}"), "request id 0"),
    ("all zeros", b"\0" * 8, "request id 0"),
    ("newline JSON (the old format)", b'{"op": "ready"}\n', "over the 100-byte bound"),
]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("name,data,message", BAD, ids=[b[0] for b in BAD])
def test_bad_headers_are_refused(feed: Any, name: str, data: bytes, message: str) -> None:
    with pytest.raises(ChannelError, match=message):
        feed(data, 100)


def test_the_bound_is_checked_before_buffering_the_payload() -> None:
    dec = FrameDecoder(limit=1 << 20)
    with pytest.raises(ChannelError):
        dec.feed(struct.pack(">II", (1 << 20) + 1, 1))
    assert dec.buffered == 0
    with pytest.raises(ChannelError):  # broken for good: no resync on a byte stream
        dec.feed(frame(1, b"{}"))


def test_a_decoder_buffers_one_frame_at_most_plus_a_read() -> None:
    dec = FrameDecoder(limit=1000)
    data = b"".join(frame(i + 1, b"y" * 900) for i in range(50))
    peak = 0
    got = 0
    for i in range(0, len(data), 300):
        got += len(dec.feed(data[i : i + 300]))
        peak = max(peak, dec.buffered)
    assert got == 50 and peak < HEADER.size + 1000 + 300


REQUESTS: list[tuple[bytes, str | None]] = [
    (b'{"op":"stats"}', "stats"),
    (b'{"op":"ready","extra":1}', "ready"),
    (b'{"op":3}', None),
    (b"{}", None),
    (b"[]", None),
    (b"not json", None),
    (b"\xff\xfe", None),
]


@pytest.mark.parametrize("payload,op", REQUESTS)
def test_decode_request(payload: bytes, op: str | None) -> None:
    if op is None:
        with pytest.raises(ChannelError):
            decode_request(Frame(1, payload))
    else:
        assert decode_request(Frame(1, payload)) == op


ANSWERS: list[tuple[bytes, tuple[bool, Any] | None]] = [
    (b'{"ok":{"a":1}}', (True, {"a": 1})),
    (b'{"ok":null}', (True, None)),
    (b'{"ok":false}', (True, False)),
    (b'{"error":"boom"}', (False, "boom")),
    (b'{"ok":1,"error":"x"}', None),
    (b'{"a":1}', None),
    (b"{}", None),
    (b"true", None),
    (b'{"ok":', None),
]


@pytest.mark.parametrize("payload,expected", ANSWERS)
def test_answers_match_their_request(payload: bytes, expected: tuple[bool, Any] | None) -> None:
    book = RequestBook()
    rid, _ = book.request("stats")
    if expected is None:
        with pytest.raises(ChannelError):
            book.answer(Frame(rid, payload))
        return
    ans = book.answer(Frame(rid, payload))
    assert ans is not None
    assert (ans.id, ans.op, ans.ok, ans.value) == (rid, "stats", *expected)
    assert len(book) == 0


def test_a_late_answer_is_dropped_and_the_next_one_is_its_own() -> None:
    """Issue 12: /config_dump used to get the answer of the /stats that timed out."""
    book = RequestBook()
    stats_id, _ = book.request("stats")
    book.abandon(stats_id)  # timed out
    dump_id, _ = book.request("config_dump")
    assert book.answer(Frame(stats_id, b'{"ok":"the stats"}')) is None
    assert book.stale == 1
    ans = book.answer(Frame(dump_id, b'{"ok":"the dump"}'))
    assert ans is not None and (ans.op, ans.value) == ("config_dump", "the dump")


def test_answers_out_of_order_and_unknown_ids() -> None:
    book = RequestBook()
    a, _ = book.request("ready")
    b, _ = book.request("stats")
    ans_b = book.answer(Frame(b, b'{"ok":2}'))
    ans_a = book.answer(Frame(a, b'{"ok":1}'))
    assert ans_a is not None and ans_b is not None
    assert (ans_a.op, ans_b.op) == ("ready", "stats")
    assert book.answer(Frame(a, b'{"ok":1}')) is None  # answered twice
    assert book.answer(Frame(999, b'{"ok":1}')) is None  # never asked
    assert book.stale == 2


def test_ids_wrap_and_skip_one_still_open() -> None:
    book = RequestBook()
    book._next = MAX_ID
    last, _ = book.request("a")
    assert last == MAX_ID
    first, data = book.request("b")
    assert first == 1
    assert struct.unpack(">II", data[:8])[1] == 1
    book._next = MAX_ID  # wraps onto MAX_ID and 1, both still open
    third, _ = book.request("c")
    assert third == 2


def test_request_frames_decode_on_the_worker_side() -> None:
    book = RequestBook()
    rid, data = book.request("config_dump")
    [f] = FrameDecoder().feed(data)
    assert f.id == rid and decode_request(f) == "config_dump"


def test_an_answer_over_the_bound_becomes_an_error_answer() -> None:
    data = encode_answer(5, "x" * 200, limit=100)
    [f] = FrameDecoder(100).feed(data)
    msg = json.loads(f.payload)
    assert f.id == 5 and "over the 100-byte bound" in msg["error"]


def test_encode_refuses_id_zero() -> None:
    with pytest.raises(ValueError):
        encode(0, {})


def test_fuzz_decode_parses_or_raises_channel_error() -> None:
    """Any bytes: frames, or ChannelError, nothing else (h11's invariant)."""
    rng = random.Random(12)
    valid = frame(1, b'{"ok":1}') + frame(2, b'{"error":"e"}')
    for _ in range(3000):
        kind = rng.randrange(3)
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        dec = FrameDecoder(limit=64)
        book = RequestBook()
        book.request("x"), book.request("y")
        try:
            step = rng.randrange(1, 9)
            for i in range(0, len(data), step):
                for f in dec.feed(data[i : i + step]):
                    book.answer(f)
        except ChannelError:
            pass


# -- both ends over a real socketpair ------------------------------------------


Handler = Callable[[str], Awaitable[Any]]


async def _pair(handle: Handler) -> tuple[SupervisorEnd, asyncio.Task[str], list[str]]:
    sup_sock, worker_sock = socket.socketpair()
    broken: list[str] = []
    end = SupervisorEnd(sup_sock, broken.append)
    await end.open()
    worker = asyncio.get_running_loop().create_task(serve_supervisor(worker_sock, handle))
    return end, worker, broken


def test_a_multi_megabyte_answer_arrives_whole() -> None:
    big = {
        "endpoints": [{"address": f"198.18.{i // 250}.{i % 250}", "n": i} for i in range(100_000)]
    }

    async def main() -> None:
        async def handle(op: str) -> Any:
            return big if op == "config_dump" else True

        end, worker, broken = await _pair(handle)
        assert len(json.dumps(big)) > 4 << 20
        assert await end.ask("config_dump", 10) == big
        assert await end.ask("ready", 5) is True  # nothing left over in the stream
        end.close()
        assert await worker == "supervisor gone"
        assert not broken

    asyncio.run(main())


def test_a_late_answer_never_reaches_the_next_request() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handle(op: str) -> Any:
            if op == "stats":
                await release.wait()  # a worker busy for longer than the timeout
            return f"answer to {op}"

        end, worker, broken = await _pair(handle)
        assert await end.ask("stats", 0.2) is None
        release.set()
        assert await end.ask("config_dump", 5) == "answer to config_dump"
        assert await end.ask("stats", 5) == "answer to stats"
        assert end.stale == 1 and not broken
        end.close()
        await worker

    asyncio.run(main())


def test_ready_is_answered_while_heavy_requests_are_built() -> None:
    """A worker answered its requests in turn: the question of a /ready
    waited for the /stats asked before it (0.9 to 2.8 s of a 444-series
    page, and kubelet probes of 1 s failed). The heavy requests (stats,
    config_dump, clusters) are answered in turn in a lane of their own,
    the others at once."""

    async def main() -> list[str]:
        release = asyncio.Event()
        order: list[str] = []

        async def handle(op: str) -> Any:
            if op in ("stats", "clusters"):
                await release.wait()  # (being built)
            order.append(op)
            return op

        end, worker, broken = await _pair(handle)
        stats = asyncio.ensure_future(end.ask("stats", 10))
        clusters = asyncio.ensure_future(end.ask("clusters", 10))
        await asyncio.sleep(0)  # (both written, ahead of the next)
        assert await end.ask("ready", 2) == "ready"
        assert await end.ask("state", 2) == "state"
        assert not stats.done()
        release.set()
        assert (await stats, await clusters) == ("stats", "clusters")
        end.close()
        await worker
        assert not broken
        return order

    assert asyncio.run(main()) == ["ready", "state", "stats", "clusters"]


def test_requests_may_overlap() -> None:
    async def main() -> None:
        async def handle(op: str) -> Any:
            await asyncio.sleep(0.01)
            return op

        end, worker, _ = await _pair(handle)
        ops = [f"op{i}" for i in range(50)]
        assert await asyncio.gather(*(end.ask(op, 5) for op in ops)) == ops
        end.close()
        await worker

    asyncio.run(main())


def test_a_failing_handler_gets_an_error_answer_and_the_worker_goes_on() -> None:
    async def main() -> None:
        async def handle(op: str) -> Any:
            if op == "clusters":
                raise RuntimeError("table is being swapped")
            return {"unserialisable": object()} if op == "odd" else op

        end, worker, broken = await _pair(handle)
        assert await end.ask("clusters", 5) is None
        assert await end.ask("odd", 5) is None
        assert await end.ask("ready", 5) == "ready"
        assert not broken and not worker.done()
        end.close()
        await worker

    asyncio.run(main())


@pytest.mark.parametrize(
    "garbage,reason",
    [
        (frame(1, b"not json"), "not JSON"),
        (struct.pack(">II", 0xFFFFFFFF, 1), "over the"),
        (b'"ready"\n', "over the"),
        (frame(1, b'{"nope":1}'), "neither"),
    ],
    ids=["not-json", "oversize", "json-line", "wrong-shape"],
)
def test_garbage_from_the_worker_breaks_the_channel(garbage: bytes, reason: str) -> None:
    """Pending requests get None at once and on_broken says why."""

    async def main() -> None:
        sup_sock, worker_sock = socket.socketpair()
        broken: list[str] = []
        end = SupervisorEnd(sup_sock, broken.append)
        await end.open()
        pending = asyncio.get_running_loop().create_task(end.ask("ready", 30))
        await asyncio.sleep(0.05)
        worker_sock.sendall(garbage)
        assert await asyncio.wait_for(pending, 5) is None
        assert end.closed and len(broken) == 1 and reason in broken[0], broken
        assert await end.ask("ready", 1) is None
        worker_sock.close()

    asyncio.run(main())


def test_the_worker_end_stops_on_a_bad_request() -> None:
    async def main() -> None:
        sup_sock, worker_sock = socket.socketpair()

        async def handle(op: str) -> Any:
            return op

        task = asyncio.get_running_loop().create_task(serve_supervisor(worker_sock, handle))
        sup_sock.sendall(struct.pack(">II", 1 << 20, 1))
        why = await asyncio.wait_for(task, 5)
        assert why.startswith("bad frame from the supervisor")
        sup_sock.close()

    asyncio.run(main())


def test_a_waiting_request_holds_up_nothing_and_a_told_one_is_written_at_once() -> None:
    """``leaving`` (channel.WAITING_OPS: answered when the worker is sent
    a SIGTERM) is answered in a task of its own: every request after it
    is answered meanwhile (in the reader's turn it held up the channel,
    the watchdog's ping too). A request told (SupervisorEnd.tell) is in
    the socket when tell() returns: a signal sent next comes after it
    (the supervisor's ``stopping`` before its SIGTERM); its task ends with
    the answer, and with None once the end closes."""

    async def main() -> None:
        signalled = asyncio.Event()
        seen: list[str] = []

        async def handle(op: str) -> Any:
            seen.append(op)
            if op == "leaving":
                await signalled.wait()
            if op == "stats":
                await asyncio.Event().wait()  # (never answered)
            return op

        end, worker, broken = await _pair(handle)
        leaving = end.tell("leaving")
        for op in ("alive", "ready", "stopping"):
            assert await end.ask(op, 2) == op
        assert not leaving.done()
        signalled.set()
        assert await asyncio.wait_for(leaving, 2) == "leaving"
        # written before tell() returns: the worker's loop, not yet run, reads it next
        told = end.tell("handover")
        assert end._writer is not None and end._writer.transport.get_write_buffer_size() == 0
        assert await asyncio.wait_for(told, 2) == "handover"
        pending = end.tell("stats")  # (never answered: the end's close ends it)
        await asyncio.sleep(0.05)
        end.close()
        assert await asyncio.wait_for(pending, 2) is None
        assert await end.tell("stopping") is None  # (closed: at once)
        await worker
        assert sorted(seen) == sorted(
            ["leaving", "alive", "ready", "stopping", "handover", "stats"]
        )
        assert not broken

    asyncio.run(main())

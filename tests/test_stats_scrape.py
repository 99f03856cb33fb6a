"""A /stats scrape of a gateway's ~1,000 Istio series, through the real
parts: workers' counters fed the relay's rows (Worker._add_rows), each
worker's control loop (run._answer_supervisor over a socketpair), the
supervisor's end of the channel, its sum (Supervisor.stats) and the admin
endpoint's page (AdminServer.dispatch).

An SRE review saw a 2-worker gateway's supervisor go from 18.6 MB to 330 MB
of RSS after a few scrapes of 444 series (an 8.6 MB page; the pod's limit
is 256 MiB), each scrape taking 2 to 3 s, and kubelet-style /ready probes
(1 s timeout) fail while a scrape was built. The memory is counted here
(tracemalloc's bytes, never time), the page checked sample by sample
against what the rows say, and /ready's turn counted against the scrape's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from l4proxy.rules.routing import MirrorTag
from l4proxy.rules.watch import RuleWatcher
from l4proxy.sidecar import istio_metrics as im
from l4proxy.sidecar.admin import AdminServer, WorkerView
from l4proxy.sidecar.channel import (
    HEADER,
    MAX_REQUEST,
    FrameDecoder,
    SupervisorEnd,
    decode_request,
    encode,
    encode_answer,
)
from l4proxy.sidecar.run import _answer_supervisor
from l4proxy.sidecar.supervisor import Supervisor
from l4proxy.sidecar.worker import (
    _DURATION_BUCKETS_MS,
    Worker,
    WorkerOptions,
    _istio_labels,
    _SubsetTag,
)
from l4proxy.stats import LabelSet, label_set

SERIES = 1000  # per worker: what one gateway in front of ~30 services may export
POD = {"app": "gateway", "version": "v1"}


def _rows(n: int, seed: int) -> list[tuple[Any, int, int, float, tuple[int, ...], int]]:
    """*n* rows of the relay's report (Worker._AnsweredRow), each of its own
    series: a destination of 37 services in 3 versions, a status, response
    flags; one in 11 a mirrored copy's. Counts and durations from *seed*."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        svc, version = f"svc{i % 37}", f"v{i % 3}"
        host = f"{svc}.default.svc.cluster.local"
        peer = im.peer_labels({"app": svc, "version": version})
        tag: Any = _SubsetTag(host, "r", version, version, f"{svc}-{version}", 8080, peer)
        if i % 11 == 0:
            tag = MirrorTag(host, "r", version, version, f"{svc}-{version}")
        flags = (0, 1, 2, 4)[(i // (37 * 3)) % 4]
        status = 200 + (i // (37 * 3 * 4)) * 7 % 400
        counts = tuple(rnd.randrange(0, 5) for _ in range(len(_DURATION_BUCKETS_MS) + 1))
        out.append((tag, status, sum(counts), rnd.random() * 10, counts, flags))
    return out


@contextlib.contextmanager
def _worker(rows: list[Any], connections: int) -> Iterator[WorkerView]:
    """A real worker (not started: nothing is served) whose relay counted
    *rows* and whose loop accepted *connections*."""
    watcher = RuleWatcher([], interval=3600, settle=0)
    worker = Worker([], watcher, WorkerOptions(http_routing="request", source_labels=POD))
    try:
        Worker._add_rows(worker.relay_counters, [], rows, worker._source)
        worker.counters.inc("l4proxy_connections_total", connections, listener="gateway")
        yield WorkerView(worker, "test")
    finally:
        worker.close()


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode = None


@contextlib.asynccontextmanager
async def _linked(
    ends: list[Callable[[socket.socket], Awaitable[None]]],
) -> AsyncIterator[Supervisor]:
    """A supervisor whose slots' links are real channel ends, each slot's
    other end served by its coroutine in *ends*."""
    sup = Supervisor(argparse.Namespace(), [[] for _ in ends])
    tasks = []
    for i, (slot, serve) in enumerate(zip(sup.slots, ends, strict=True)):
        ours, theirs = socket.socketpair()
        tasks.append(asyncio.ensure_future(serve(theirs)))
        link = SupervisorEnd(ours, lambda why: None)
        await link.open()
        slot.proc, slot.link = _Proc(100 + i), link  # type: ignore[assignment]
    try:
        yield sup
    finally:
        for slot in sup.slots:
            assert slot.link is not None
            slot.link.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _served(views: list[WorkerView]) -> contextlib.AbstractAsyncContextManager[Supervisor]:
    """A supervisor whose slots' links are real channel ends to *views*,
    each answered by the worker's own control loop (_answer_supervisor)."""
    return _linked(
        [lambda s, view=view: _answer_supervisor(s, view, asyncio.Event()) for view in views]
    )


async def _recorded(views: list[WorkerView]) -> list[bytes]:
    """Each worker's answer to the supervisor's ``stats``, as its control
    loop wrote it (the payload of its frame)."""
    out = []
    for view in views:
        ours, theirs = socket.socketpair()
        task = asyncio.ensure_future(_answer_supervisor(theirs, view, asyncio.Event()))
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(encode(1, {"op": "stats"}, MAX_REQUEST))
        length, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
        out.append(await reader.readexactly(length))
        writer.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return out


async def _replay(sock: socket.socket, stats: bytes) -> None:
    """A worker's end that answers ``stats`` with the payload *stats*
    (recorded), ``state`` LIVE and any other True, each at once, in turn."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    decoder = FrameDecoder(MAX_REQUEST)
    while data := await loop.sock_recv(sock, 65536):
        for frame in decoder.feed(data):
            op = decode_request(frame)
            if op == "stats":  # (the header, then the payload itself: no copy of it)
                await loop.sock_sendall(sock, HEADER.pack(len(stats), frame.id))
                await loop.sock_sendall(sock, stats)
            else:
                await loop.sock_sendall(
                    sock, encode_answer(frame.id, "LIVE" if op == "state" else True)
                )


def _replayed(answers: list[bytes]) -> contextlib.AbstractAsyncContextManager[Supervisor]:
    """A supervisor whose slots' links are real channel ends to workers
    that answer at once with *answers* (_replay): what the supervisor
    does with them, and only that, is what happens in its process."""
    return _linked([lambda s, stats=stats: _replay(s, stats) for stats in answers])


async def _page(admin: AdminServer) -> bytes:
    status, _, body = await admin.dispatch("GET", "/stats/prometheus")
    assert status == 200
    return body if isinstance(body, bytes) else body.encode()


# -- memory ----------------------------------------------------------------------


def test_a_scrape_of_a_thousand_series_holds_about_its_page() -> None:
    """The supervisor's allocations during a scrape of two workers' 1,000
    series each (a 21 MB page): at most twice the page at the peak, and
    after it, with the page gone, what it keeps (each worker's last counts)
    is a tenth of the page, the same after the second scrape as after the
    first. Each bucket a row of all its labels from the worker, an expanded
    copy per worker kept and the page built as a list of lines and joined:
    24 times the page at the peak (427 MB), and 12 times kept."""
    rows = _rows(SERIES, seed=1)
    other = [
        (tag, status, n, s, b, f)
        for (tag, status, *_), (_, _, n, s, b, f) in zip(rows, _rows(SERIES, seed=2), strict=True)
    ]

    async def main() -> list[tuple[int, int, int]]:
        with _worker(rows, 10) as w0, _worker(other, 20) as w1:
            answers = await _recorded([w0, w1])
        async with _replayed(answers) as sup:
            admin = AdminServer(sup, lambda: None)
            del answers  # (the replaying ends hold theirs)
            out = []
            tracemalloc.start()
            try:
                for _ in range(2):
                    before = tracemalloc.get_traced_memory()[0]
                    tracemalloc.reset_peak()
                    page = await _page(admin)
                    size = len(page)
                    peak = tracemalloc.get_traced_memory()[1] - before
                    del page
                    out.append((size, peak, tracemalloc.get_traced_memory()[0] - before))
            finally:
                tracemalloc.stop()
            return out

    (size, peak, kept), (size2, peak2, kept2) = asyncio.run(main())
    assert size == size2 > 15_000_000  # (the page: 1,000 series of ~25 labels, 23 samples each)
    assert peak < 2 * size and peak2 < 2 * size, (size, peak, peak2)
    assert kept < size // 5, (size, kept)
    assert kept2 < size // 100, (size, kept2)  # nothing more kept by the second


# -- the page --------------------------------------------------------------------

_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _samples(page: str) -> list[tuple[str, LabelSet, float]]:
    """The page's samples in order: name, labels (as written), value."""
    out = []
    for line in page.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        assert m is not None, line
        name, body, value = m.groups()
        out.append((name, tuple(_PAIR.findall(body or "")), float(value)))
    return out


def _expected(rows_per_worker: list[list[Any]]) -> dict[tuple[str, LabelSet], float]:
    """What the rows say each Istio sample is, summed over the workers:
    a row's count in ``*_requests_total``, its histogram's cumulative
    buckets, +Inf its count, its sum in ms and its count."""
    source = im.source_labels(POD, "default")
    out: dict[tuple[str, LabelSet], float] = {}

    def add(name: str, key: LabelSet, v: float) -> None:
        out[(name, key)] = out.get((name, key), 0.0) + v

    for rows in rows_per_worker:
        for tag, status, count, seconds, counts, flags in rows:
            key = label_set(_istio_labels(tag, status, source, flags))
            mirrored = isinstance(tag, MirrorTag)
            total = im.MIRROR_REQUESTS if mirrored else im.REQUESTS
            family = im.MIRROR_DURATION if mirrored else im.DURATION
            add(total, key, count)
            running = 0
            for le, n in zip(_DURATION_BUCKETS_MS, counts, strict=False):
                running += n
                le_text = str(int(le)) if float(le).is_integer() else repr(le)
                add(family + "_bucket", label_set({**dict(key), "le": le_text}), running)
            add(family + "_bucket", label_set({**dict(key), "le": "+Inf"}), count)
            add(family + "_sum", key, seconds * 1000.0)
            add(family + "_count", key, count)
    return out


def test_the_page_says_what_the_rows_counted_in_order() -> None:
    """Two workers' rows, some series of both and some of one, one worker
    replaced after the first scrape (its counts kept): every Istio sample
    of the page is what the rows say (parsed, not as bytes), and the page
    is in Prometheus' order: families by name, a family's series by label
    set, a histogram's buckets by bound, +Inf, then _sum and _count."""
    first, second = _rows(300, seed=3), _rows(400, seed=4)[100:]
    again = _rows(300, seed=5)[:50]  # the replacement's own

    async def main() -> str:
        with _worker(first, 3) as w0, _worker(second, 4) as w1, _worker(again, 5) as w2:
            async with _served([w0, w1]) as sup:
                admin = AdminServer(sup, lambda: None)
                await _page(admin)
                async with _served([w2]) as other:  # worker 0 replaced by another process
                    sup.slots[0].proc, sup.slots[0].link = _Proc(200), other.slots[0].link
                    return (await _page(admin)).decode()

    samples = _samples(asyncio.run(main()))
    got = {
        (n, tuple(sorted(k))): v
        for n, k, v in samples
        if n.startswith(("istio_", "l4proxy_mirror"))
    }
    expected = _expected([first, second, again])
    assert set(got) == set(expected)
    wrong = {k: (got[k], v) for k, v in expected.items() if not math.isclose(got[k], v)}
    assert not wrong, list(wrong.items())[:3]
    assert ("l4proxy_worker_connections_total", (("worker", "0"),), 8.0) in samples
    assert ("l4proxy_connections_total", (("listener", "gateway"),), 12.0) in samples

    def order(sample: tuple[str, LabelSet, float]) -> tuple[Any, ...]:
        name, labels, _ = sample
        family = re.sub("_(bucket|sum|count)$", "", name)
        if family not in (im.DURATION, im.MIRROR_DURATION):
            return (name, labels)
        le = dict(labels).get("le")
        part = ("_bucket", "_sum", "_count").index(name.removeprefix(family))
        bound = math.inf if le in (None, "+Inf") else float(le)
        return (family, tuple(kv for kv in labels if kv[0] != "le"), part, bound)

    assert [order(s) for s in samples] == sorted(order(s) for s in samples)
    assert all(list(labels) == sorted(labels) for _, labels, _ in samples)


# -- /ready while a scrape is built ----------------------------------------------


async def _ready_during_a_scrape(sup: Supervisor, answered: bool) -> tuple[bool, bool]:
    """A scrape, and a /ready asked once the scrape's round has asked
    every worker (its requests written), or with *answered* once every
    worker has answered it. Whether /ready was answered while every
    worker's answer was still to come, and before the scrape's page."""

    def asked() -> bool:  # a request of the round's open at every worker
        return all(s.link is not None and len(s.link._book) for s in sup.slots)

    async def until(cond: Any) -> None:
        for _ in range(10_000):
            if cond():
                return
            await asyncio.sleep(0)
        raise AssertionError("the scrape's round never came there")

    async def probe() -> tuple[tuple[int, str, str | bytes], bool]:
        answer = await admin.dispatch("GET", "/ready")
        return answer, asked()  # (at once: in the turn it was answered)

    admin = AdminServer(sup, lambda: None)
    scrape = asyncio.ensure_future(admin.dispatch("GET", "/stats/prometheus"))
    await until(asked)
    if answered:
        await until(lambda: not asked())
    ready = asyncio.ensure_future(probe())
    done, _ = await asyncio.wait({scrape, ready}, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(scrape, ready)
    answer, building = ready.result()
    assert answer == (200, "text/plain", "LIVE\n")
    assert scrape.result()[0] == 200
    return building, ready in done


def test_ready_is_answered_while_the_workers_build_a_scrape() -> None:
    """Two real workers' control loops, each with 4,000 series to send: a
    /ready asked while they build their answers is answered before either
    has answered. A worker answered its requests in turn and built its
    stats in one go on its loop: /ready's question to it waited for the
    whole, and the probe got a 503 after 3 s."""
    rows = _rows(4 * SERIES, seed=6)

    async def main() -> bool:
        with _worker(rows, 1) as w0, _worker(rows, 1) as w1:
            async with _served([w0, w1]) as sup:
                building, _ = await _ready_during_a_scrape(sup, answered=False)
                return building

    assert asyncio.run(main())


def test_ready_is_answered_while_the_supervisor_sums_and_writes_a_scrape() -> None:
    """Workers that answer at once (1,000 series each, recorded): a /ready
    asked once they have, while the supervisor decodes, sums and writes
    the page, is answered before the page is done. The supervisor did all
    of that in one go on its loop, /ready's answer after it."""
    rows = _rows(SERIES, seed=7)

    async def main() -> bool:
        with _worker(rows, 1) as w0, _worker(rows, 1) as w1:
            answers = await _recorded([w0, w1])
        async with _replayed(answers) as sup:
            _, first = await _ready_during_a_scrape(sup, answered=True)
            return first

    assert asyncio.run(main())


# -- the page's buffer -------------------------------------------------------------

_MAPPED = r"""
import ctypes, sys
from l4proxy.sidecar.lean import map_large_allocations

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "mapped":
    assert map_large_allocations()
page = bytes(4 << 20)  # a first page, sent and freed
del page
page = bytes(3 << 20)  # the next one
print(libc.mallinfo2().hblkhd >= 3 << 20)  # mapped on its own
"""


def test_a_page_after_the_first_is_mapped_on_its_own() -> None:
    """glibc maps a large allocation until one is freed, then serves the
    next from its heap (its threshold raised to the size freed), which
    keeps the pages once that is freed too: after a few scrapes the
    supervisor stayed 12 MB above its start. The process serving /stats
    sets the threshold for good (lean.map_large_allocations)."""

    def mapped(mode: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", _MAPPED, mode], capture_output=True, text=True, check=True
        )
        return run.stdout.strip()

    assert (mapped("mapped"), mapped("default")) == ("True", "False")

"""Micro-benchmark of the pump twins on loopback TCP (not a test).

    .venv/bin/python bench/pump_micro.py [--bulk-mib 2048] [--conns 3000] [--twins compiled,pure]

Scenarios, each for every twin, plus a no-pump baseline where it makes sense:

* ``bulk``: one stream client → server, default settings (recv/send, then
  splice after 256 KiB). The endpoints run in a forked child, so the bench
  process holds only the pump (and an idle main thread).
* ``bulk+busy``: the same while the bench process's main thread runs pure
  Python (a stand-in for a busy sidecar event loop). The compiled loop never
  takes the GIL; the pure twin has to share it.
* ``short``: request/response connections (100 B each way, then close), 8 at
  a time. The main thread plays the sidecar (accept, connect upstream,
  ``add()``); the child plays clients and servers. This mostly measures the
  Python accept/connect path around the pump, which is the same for both.

Numbers on a 2-core machine are noisy: compare twins within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from types import ModuleType
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from l4proxy.dataplane import _impl

MiB = 1 << 20


def _bulk_child(front: tuple[str, int], back: socket.socket, total: int, out: Any) -> None:
    """Client sends *total* bytes to *front*; server accepts on *back* and
    reads to EOF. Reports seconds from the first send to the last byte."""
    chunk = memoryview(bytes(MiB))
    got = [0]

    def server() -> None:
        s, _ = back.accept()
        buf = bytearray(4 * MiB)
        while n := s.recv_into(buf):
            got[0] += n
        s.close()

    t = threading.Thread(target=server)
    t.start()
    c = socket.create_connection(front)
    t0 = time.perf_counter()
    left = total
    while left:
        c.sendall(chunk[: min(left, MiB)])
        left -= min(left, MiB)
    c.shutdown(socket.SHUT_WR)
    t.join()
    out.put((time.perf_counter() - t0, got[0]))
    c.close()


def _short_child(front: tuple[str, int], back: socket.socket, n: int, out: Any) -> None:
    done = [0]
    lock = threading.Lock()

    def server() -> None:
        while True:
            s, _ = back.accept()
            req = b""
            while b := s.recv(4096):
                req += b
            if req == b"stop":
                s.close()
                return
            s.sendall(b"r" * 100)
            s.close()

    def client(k: int) -> None:
        for _ in range(k):
            c = socket.create_connection(front)
            c.sendall(b"q" * 100)
            c.shutdown(socket.SHUT_WR)
            while c.recv(4096):
                pass
            c.close()
            with lock:
                done[0] += 1

    st = threading.Thread(target=server)
    st.start()
    workers = [threading.Thread(target=client, args=(n // 8,)) for _ in range(8)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    c = socket.create_connection(front)  # tells the sidecar loop to stop
    c.sendall(b"stop")
    c.shutdown(socket.SHUT_WR)
    c.close()
    st.join()
    out.put((elapsed, done[0]))


def _listeners() -> tuple[socket.socket, socket.socket]:
    return (
        socket.create_server(("127.0.0.1", 0), backlog=1024),
        socket.create_server(("127.0.0.1", 0), backlog=1024),
    )


def _spin(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def _pump_cpu_s() -> float:
    """CPU seconds (user + system) used so far by the pump thread."""
    for t in threading.enumerate():
        if t.name.startswith("l4proxy-pump") and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def bulk(twin: ModuleType | None, total: int, busy: bool, **kw: int) -> tuple[float, float]:
    """(MiB/s, pump-thread CPU seconds per GiB) of one stream; *twin* None
    means client → server directly."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    front, back = _listeners()
    target = back.getsockname() if twin is None else front.getsockname()
    child = ctx.Process(target=_bulk_child, args=(target, back, total, out))
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,))
    if busy:
        spinner.start()
    child.start()
    p = None
    if twin is not None:
        p = twin.Pump(**kw)
        p.start()
        pc, _ = front.accept()
        pu = socket.create_connection(back.getsockname())
        pc.setblocking(False)
        pu.setblocking(False)
        p.add(pc.detach(), pu.detach())
    elapsed, got = out.get()
    child.join()
    stop.set()
    if busy:
        spinner.join()
    cpu = 0.0
    if p is not None:
        cpu = _pump_cpu_s()
        p.close()
    front.close()
    back.close()
    assert got == total, (got, total)
    return total / MiB / elapsed, cpu / (total / (1 << 30))


def short(twin: ModuleType, n: int) -> float:
    """Connections per second, request/response of 100 B, 8 in flight."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    front, back = _listeners()
    child = ctx.Process(target=_short_child, args=(front.getsockname(), back, n, out))
    child.start()
    p = twin.Pump()
    p.start()
    while True:  # the sidecar's part, minus peeking and routing
        pc, _ = front.accept()
        pu = socket.create_connection(back.getsockname())
        pc.setblocking(False)
        pu.setblocking(False)
        p.add(pc.detach(), pu.detach())
        if p.stats()["accepted"] > n // 8 * 8:
            break
    elapsed, done = out.get()
    child.join()
    stats = p.stats()
    p.close()
    front.close()
    back.close()
    assert stats["errors"] == 0, stats
    return float(done) / float(elapsed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bulk-mib", type=int, default=2048)
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--twins", default="compiled,pure")
    args = ap.parse_args()
    twins: dict[str, ModuleType] = {}
    for name in args.twins.split(","):
        try:
            twins[name] = _impl.load_pure("pump") if name == "pure" else _impl.load_compiled("pump")
        except ImportError as exc:
            print(f"{name}: not available ({exc})")
    total = args.bulk_mib * MiB
    never = 1 << 62
    print(f"bulk {args.bulk_mib} MiB, one stream: MiB/s, pump-thread CPU s/GiB")
    print(f"  {'direct (no pump)':<28} {bulk(None, total, False)[0]:8.0f}")
    for name, mod in twins.items():
        for label, kw in (
            ("default", {}),
            ("recv/send only", {"splice_threshold": never}),
            ("splice from byte 0", {"splice_threshold": 0}),
        ):
            rate, cpu = bulk(mod, total, False, **kw)
            print(f"  {name + ', ' + label:<28} {rate:8.0f} {cpu:8.2f}")
    print("bulk with a busy interpreter thread in the pump's process: MiB/s, CPU s/GiB")
    for name, mod in twins.items():
        rate, cpu = bulk(mod, total, True)
        print(f"  {name:<28} {rate:8.0f} {cpu:8.2f}")
    print(f"short connections, {args.conns} x (100 B each way), 8 in flight (conn/s):")
    for name, mod in twins.items():
        print(f"  {name:<22} {short(mod, args.conns):8.0f}")


if __name__ == "__main__":
    main()

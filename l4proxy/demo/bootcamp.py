"""The bootcamp app: answers like ``docker.io/jocatalin/kubernetes-bootcamp``.

Any method, any path: ``200``, ``Content-Type: text/plain``, body
``Hello Kubernetes bootcamp! | Running on: <pod> | v=<version>`` and a
newline, written chunked (no Content-Length) on HTTP/1.1 and close-delimited
on HTTP/1.0, like the Node.js original. Keep-alive is honoured.

The demo and the tests run one per pod namespace::

    python -m l4proxy.demo.bootcamp --port 8080 --pod bootcamp-v1-0 --version 1

For ``l4proxy canary`` (issue 13) a version can be made bad on purpose:
``--fail-rate 0.2`` answers ``500`` to that share of requests (drawn from
``random.Random(--seed)``, so a run repeats), ``--delay-ms N`` answers every
request N ms late.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
from collections import Counter

from l4proxy.dataplane import peek

ANSWER = re.compile(r"Hello Kubernetes bootcamp! \| Running on: (\S+) \| v=(\d+)")


def tally(text: str) -> tuple[Counter[str], Counter[str]]:
    """Count the answers in *text*: (per version "v1"/"v2"..., per pod)."""
    versions: Counter[str] = Counter()
    pods: Counter[str] = Counter()
    for m in ANSWER.finditer(text):
        pods[m.group(1)] += 1
        versions["v" + m.group(2)] += 1
    return versions, pods


def answer(pod: str, version: str) -> bytes:
    return f"Hello Kubernetes bootcamp! | Running on: {pod} | v={version}\n".encode()


class Faults:
    """Injected failures and latency (issue 13's bad canary); none by default."""

    def __init__(self, fail_rate: float = 0.0, delay_ms: float = 0.0, seed: int = 0) -> None:
        self.fail_rate = fail_rate
        self.delay = delay_ms / 1000.0
        self.rng = random.Random(seed)

    def fails(self) -> bool:
        return self.fail_rate > 0 and self.rng.random() < self.fail_rate


FAILED = b"injected failure (--fail-rate)\n"


async def _serve_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    body: bytes,
    faults: Faults | None = None,
) -> None:
    buf = b""
    try:
        while True:
            parser = peek.HeadParser()
            head = parser.feed(buf) if buf else None
            while head is None:
                data = await reader.read(65536)
                if not data:
                    return
                head = parser.feed(data)
            rest = parser.buffered[head.head_length :]
            # Discard a Content-Length body (the app ignores it).
            need = head.content_length or 0
            while len(rest) < need:
                data = await reader.read(65536)
                if not data:
                    return
                rest += data
            buf = rest[need:]
            http10 = head.version == "HTTP/1.0"
            keep = head.keep_alive
            status = b"200 OK"
            if faults is not None:
                if faults.delay:
                    await asyncio.sleep(faults.delay)
                if faults.fails():
                    status, body_now = b"500 Internal Server Error", FAILED
            if status != b"200 OK":
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                    + (b"" if keep and not http10 else b"Connection: close\r\n")
                    + b"Content-Length: %d\r\n\r\n" % len(body_now)
                    + body_now
                )
                await writer.drain()
                if not keep or http10:
                    return
                continue
            if http10:
                writer.write(
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                    + (
                        b"Connection: keep-alive\r\nContent-Length: %d\r\n" % len(body)
                        if keep
                        else b""
                    )
                    + b"\r\n"
                    + body
                )
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + (b"" if keep else b"Connection: close\r\n")
                    + b"Transfer-Encoding: chunked\r\n\r\n"
                    + b"%x\r\n" % len(body)
                    + body
                    + b"\r\n0\r\n\r\n"
                )
            await writer.drain()
            if not keep:
                return
    except (peek.HeadError, ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(
    host: str | None, port: int, pod: str, version: str, faults: Faults | None = None
) -> None:
    body = answer(pod, version)
    server = await asyncio.start_server(
        lambda r, w: _serve_client(r, w, body, faults), host, port, reuse_address=True, backlog=1024
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m l4proxy.demo.bootcamp", description=__doc__)
    p.add_argument("--host", default=None, help="address to bind (default: all, IPv4 and IPv6)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--pod", required=True, help="pod name shown in the answer")
    p.add_argument("--version", default="1", help="the v=N in the answer")
    p.add_argument(
        "--fail-rate", type=float, default=0.0, help="answer 500 to this share (0..1) of requests"
    )
    p.add_argument("--delay-ms", type=float, default=0.0, help="answer every request this late")
    p.add_argument("--seed", type=int, default=0, help="seed of --fail-rate's draws (0)")
    args = p.parse_args(argv)
    faults = (
        Faults(args.fail_rate, args.delay_ms, args.seed)
        if args.fail_rate or args.delay_ms
        else None
    )
    asyncio.run(serve(args.host, args.port, args.pod, args.version, faults))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

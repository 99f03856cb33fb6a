"""Micro-benchmark of the request-head peek: heads per second, both twins.

Not a test. Run from the repository root after building the extension::

    .venv/bin/python bench/peek_micro.py [--seconds 1.0]

For each twin it times three ways the sidecar may call the parser on a
typical curl request head (78 bytes): ``parse_head(data)`` (one-shot),
``HeadParser().feed(data)`` (a fresh parser per connection, the head in one
read), and the same head fed in 3 pieces (a head split across reads). Each
figure is the best of five runs; the last column is compiled / pure.
Absolute numbers depend on the machine; compare the twins in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType

# Run from a checkout: import the l4proxy next to this script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from l4proxy.dataplane import _impl

CURL_HEAD = (
    b"GET / HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)


def one_shot(mod: ModuleType) -> Callable[[], object]:
    parse_head = mod.parse_head
    return lambda: parse_head(CURL_HEAD)


def fresh_parser(mod: ModuleType) -> Callable[[], object]:
    cls = mod.HeadParser
    return lambda: cls().feed(CURL_HEAD)


def three_reads(mod: ModuleType) -> Callable[[], object]:
    cls = mod.HeadParser
    a, b, c = CURL_HEAD[:20], CURL_HEAD[20:50], CURL_HEAD[50:]

    def run() -> object:
        parser = cls()
        parser.feed(a)
        parser.feed(b)
        return parser.feed(c)

    return run


def heads_per_second(fn: Callable[[], object], seconds: float) -> float:
    assert fn() is not None
    # Calibrate a batch size that takes about seconds/5.
    n = 1000
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt > seconds / 5:
            break
        n *= 2
    best = dt
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = ap.parse_args()

    twins: dict[str, ModuleType] = {"pure": _impl.load_pure("peek")}
    try:
        twins["compiled"] = _impl.load_compiled("peek")
    except ImportError as exc:
        print(f"compiled twin not built ({exc}); showing the pure twin only", file=sys.stderr)

    print(f"python {sys.version.split()[0]}, head of {len(CURL_HEAD)} bytes, heads/s")
    print(f"{'case':<28}{'pure':>12}{'compiled':>12}{'ratio':>8}")
    for label, make in (
        ("parse_head(data)", one_shot),
        ("HeadParser().feed(data)", fresh_parser),
        ("HeadParser, 3 feeds", three_reads),
    ):
        rates = {name: heads_per_second(make(mod), args.seconds) for name, mod in twins.items()}
        pure = rates["pure"]
        comp = rates.get("compiled")
        comp_s = f"{comp:>12,.0f}" if comp else f"{'-':>12}"
        ratio = f"{comp / pure:>7.1f}x" if comp else f"{'-':>8}"
        print(f"{label:<28}{pure:>12,.0f}{comp_s}{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

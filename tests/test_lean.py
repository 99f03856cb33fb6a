"""What the sidecar's processes leave out (l4proxy.sidecar.lean).

Each case runs in a fresh interpreter: what is imported is the point."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from l4proxy.sidecar import lean
from tests.mesh import Mesh, route_rule
from tests.test_reload import big_rules


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


_SERVE_ONE = """
    import sys
    from l4proxy.sidecar import lean
    lean.keep_out()
    import asyncio
    uvloop = lean.import_uvloop()

    async def main():
        async def echo(r, w):
            w.write(await r.readline()); await w.drain(); w.close()
        srv = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"ping\\n")
        got = await r.readline()
        try:
            await asyncio.open_connection("127.0.0.1", port, ssl=True)
            tls = "tls-worked"
        except lean.NoTLSError:
            tls = "no-tls"
        srv.close()
        return got.decode().strip(), tls

    got, tls = uvloop.run(main())
    maps = open("/proc/self/maps").read()
    print(got, tls, "libssl" in maps or "libcrypto" in maps, sys.modules["ssl"] is None,
          type(uvloop.new_event_loop()).__module__)
"""


def test_uvloop_runs_with_openssl_kept_out() -> None:
    """uvloop loads against the stand-in, serves and connects; a TLS call
    fails clearly; neither libssl nor libcrypto is mapped afterwards."""
    assert _run(_SERVE_ONE) == "ping no-tls False True uvloop"


def test_a_uvloop_that_needs_more_of_ssl_gets_the_real_module() -> None:
    """Should uvloop read a name the stand-in lacks, OpenSSL is loaded: the
    cost is memory, never a worker that does not start."""
    code = """
    import sys, types
    from l4proxy.sidecar import lean
    lean._stand_in = lambda: types.ModuleType("ssl")  # has none of the names
    lean.keep_out()
    import asyncio
    uvloop = lean.import_uvloop()
    print(uvloop.new_event_loop().__class__.__name__, sys.modules["ssl"].__name__,
          "libssl" in open("/proc/self/maps").read())
    """
    assert _run(code) == "Loop ssl True"


def test_argparse_runs_without_the_compressors() -> None:
    """argparse (through shutil) would load bz2 and lzma and their libraries."""
    code = """
    import sys
    from l4proxy.sidecar import lean
    lean.keep_out()
    from l4proxy.cli import build_parser
    build_parser("run").parse_args(["run", "--rules", "/nonexistent"])
    maps = open("/proc/self/maps").read()
    print("shutil" in sys.modules, "libbz2" in maps or "liblzma" in maps)
    """
    assert _run(code) == "True False"


def test_a_worker_gets_one_malloc_arena_and_malloc_unless_told_otherwise() -> None:
    assert lean.worker_env({"PATH": "/bin"}) == {
        "PATH": "/bin",
        "MALLOC_ARENA_MAX": "1",
        "PYTHONMALLOC": "malloc",
    }
    assert lean.worker_env({"MALLOC_ARENA_MAX": "4"})["MALLOC_ARENA_MAX"] == "4"
    assert lean.worker_env({"PYTHONMALLOC": "pymalloc"})["PYTHONMALLOC"] == "pymalloc"


def _rss_anon_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        found = re.search(r"RssAnon:\s+(\d+)", f.read())
    assert found
    return int(found.group(1))


@pytest.mark.netns
def test_a_worker_gives_back_what_a_big_reload_freed(mesh: Mesh) -> None:
    """2,000 ServiceEntries and 2,000 RouteRules loaded, then the small rule
    set again: the worker's memory falls back near where it started. Measured
    before give_back_memory: 22 MB at start, 88 with the big set, 60 after it
    (free lists and malloc's free pages held what the parse had freed); then
    about 23. With pymalloc, 9-14 MB were kept over the start (20.5 MB), on
    an idle or a busy host alike: 10-12 of its 1 MiB arenas that the big load
    had filled, each kept by a few live blocks (the new table, the loop's
    futures, buffers of older objects; see lean.py). The worker runs on
    glibc's malloc (PYTHONMALLOC=malloc, lean.worker_env), whose trim
    returns every free page: 1.1-2.7 MB kept over a start of 20.1 MB, peak
    72.7 MB (11 runs, 6 of them on a host kept busy by two spinning loops);
    the bound is 6 MB."""
    mesh.start("compiled-uvloop", route_rule({"v1": 50, "v2": 50}))
    assert mesh.sidecar is not None
    [worker] = mesh.sidecar.worker_pids()
    start = _rss_anon_kb(worker)
    for rules, name in ((big_rules(2000), "big.yaml"), (None, "big.yaml")):
        gen = mesh.sidecar.stat("l4proxy_rules_generation")
        if rules is None:
            mesh.remove_rules(name)
        else:
            mesh.write_rules(rules, name=name)
        deadline = time.monotonic() + 60
        while mesh.sidecar.stat("l4proxy_rules_generation") <= gen:
            assert time.monotonic() < deadline, "the rules never went live"
            time.sleep(0.2)
        if rules is not None:
            big = _rss_anon_kb(worker)
    after = _rss_anon_kb(worker)
    assert big - start > 30_000, (start, big)  # the big set really was loaded
    assert after - start < 6_000, (start, big, after)

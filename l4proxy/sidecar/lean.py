"""What the sidecar's processes leave out, to be small in every pod.

A sidecar runs two Python processes (supervisor and worker) in every pod of
a mesh, so what each loads is paid thousands of times over.

* **OpenSSL.** ``import asyncio`` loads ``ssl`` (and the standard library's
  ``_hashlib``), which maps libssl and libcrypto: about 4.5 MB of RSS per
  process. Nothing in ``l4proxy run`` opens a TLS connection (TLS passes
  through as bytes), so both processes mark the modules absent before anything
  imports them (:func:`keep_out`): asyncio then runs without TLS support and
  hashlib uses its builtin digests.
* **Compression.** ``argparse`` imports ``shutil`` (for the terminal width),
  which loads ``bz2`` and ``lzma`` with their libraries when it can (0.6 MB a
  process). The sidecar compresses nothing; shutil does without them.
* **uvloop's ``ssl``.** uvloop, the worker's event loop, imports ``ssl``
  unconditionally and reads a few names from it when it loads.
  :func:`import_uvloop` gives it a stand-in module for that import only. Its
  classes are never instantiated: a TLS call on the loop gets
  :class:`NoTLSError`. Should a uvloop release need more of ``ssl`` than the
  stand-in has, the real module is imported instead (the cost is memory, never
  a failure).
* **malloc arenas.** glibc gives each thread that allocates an arena of its
  own. The worker's compiled relay allocates its connections on its own
  thread, in an arena beside the main heap, where memory the interpreter
  freed at start-up stays unused. :func:`worker_env` asks for one arena
  (``MALLOC_ARENA_MAX=1``, unless the environment says otherwise): 10k idle
  connections cost 3.3 MB instead of 4.9. Small allocations still go through
  each thread's tcache, without the arena's lock.
* **pymalloc's arenas.** CPython serves objects of up to 512 bytes (and
  small dict key tables, list and set buffers) from arenas of 1 MiB of its
  own, and gives an arena back only once every block in it is free. A rule
  load fills tens of them, and whatever long-lived block is allocated among
  them meanwhile keeps its whole arena: the new table (built while the old
  one serves), the loop's futures and timers, a module's dict or list that
  grew. Measured in a worker after loading 2,000 + 2,000 objects and then a
  small rule set again: 10 to 12 new arenas (1-3 MiB mappings) were left,
  each holding from none to a few hundred objects the collector can reach
  (where none, blocks that are no object: dict key tables, list buffers):
  9-14 MB over the worker's start, the same five seconds later.
  :func:`worker_env` also sets ``PYTHONMALLOC=malloc`` (unless the
  environment says otherwise): every block then comes from glibc, whose
  ``malloc_trim`` (:func:`give_back_memory`) returns each free page inside
  its heap, so a few live blocks keep their pages, not a MiB each. The same
  worker kept 1.1-2.7 MB; it started 0.4 MB smaller (20.1 MB against 20.5)
  and peaked higher during the big load (72.7 MB against 63.3: malloc's
  per-block overhead); 9,900 idle connections held 1.06 KB each against 1.12
  (python -m bench --memory, both processes on malloc). The price is CPU
  where Python allocates most, counted with callgrind: a request through the
  compiled relay 2,551 instructions instead of 2,517 (bench.instructions;
  its loop 2,408 against 2,405), a rule load of 400 + 400 objects 12 % more,
  the interpreter's start-up 19 % more. The pure-Python relay
  (``L4PROXY_NO_EXTENSIONS=1``, or no compiled extensions) allocates at each
  step and pays 8 %: 1,019,000 instructions a request against 941,000 (two
  runs each of 650-820 requests; the same with the supervisor on malloc too).
  Only the worker is started so: the supervisor and anything else l4proxy
  runs (``demo``, ``canary``, their backends) keep the environment given.
* **what a load freed.** Parsing and compiling rules allocates several times
  the table it builds; once the parse is over, most of that is free but not
  returned. Measured after loading 2,000 + 2,000 objects and then a small rule
  set again: the worker held 72 MB where it had started at 29. Two things pin
  it. CPython's free lists (tuples, lists, dicts, floats) keep thousands of
  dead objects for reuse, scattered over the allocator's 1 MiB arenas, and one
  such object keeps its whole arena; they are emptied only by a full
  collection of the oldest generation, which may not come for hours. And
  glibc keeps freed pages inside its heap. :func:`give_back_memory` empties
  the free lists (a collection with every object frozen: it examines none, a
  few milliseconds) and calls ``malloc_trim(0)`` (under a millisecond): the
  same worker fell back to 35 MB. Both processes call it once started; the
  worker after every rule load too (:mod:`l4proxy.rules.watch`). The price:
  CPython then counts no long-lived objects, so its next automatic
  collection of the oldest generation comes soon and is a full one (tens of
  milliseconds for a big table), once per call; rule loads are rare.
* **a table made in a thread.** A DNS change's expanded table (tens of
  thousands of endpoint entries, a few hundred thousand objects) is made
  with the collector paused (:mod:`l4proxy.rules.watch`); once it ran
  again, its young, middle and then full passes each examined every object
  of the new table with the GIL held: 2 x 70 ms or more on the loop at each
  swap (54,000 entries), 0.35-0.58 s with 180,000. :func:`freeze_new_table`
  freezes the heap as the table is made (in the expansion's thread, still
  paused): the collector never examines the table, and reference counting
  frees it when the next one replaces it (a table forms no cycles) as it
  frees any frozen object. Before each expansion, :func:`collect_unfrozen`
  collects what is not frozen (what the loop made since the last one: a
  few milliseconds), so that young cyclic garbage is not frozen with the
  table; and every ``FULL_PASS_EVERY`` expansions it unfreezes the heap
  first and collects it whole, the full pass over the live table that
  frees cycles among objects frozen while they lived (a connection's, an
  exception's): one long pass in 16 swaps, not three at each.
  :func:`give_back_memory` (after a reload) unfreezes the heap as before.
* **a /stats page.** The process that serves the admin endpoint writes
  each /stats page into one buffer (8.6 MB for 444 Istio series), grown as
  it is written and freed once sent. glibc maps an allocation that large
  with mmap, until one is freed: it then raises its threshold to that size
  (up to 32 MB) and serves the next page from its heap, which a realloc
  copies as it grows (twice the page at its peak) and which keeps the pages
  once freed (the supervisor stayed 12 MB above its start after a scrape).
  :func:`map_large_allocations` sets the threshold to 1 MiB for good: a
  page grows in place (mremap) and its memory goes back to the kernel when
  it is freed.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("l4proxy")

OPENSSL_MODULES = ("ssl", "_ssl", "_hashlib")
LEFT_OUT = (*OPENSSL_MODULES, "bz2", "_bz2", "lzma", "_lzma")


class NoTLSError(RuntimeError):
    pass


def keep_out() -> None:
    """Mark OpenSSL's and the compressors' modules absent (before anything
    imports them: asyncio, argparse)."""
    for name in LEFT_OUT:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def _stand_in() -> types.ModuleType:
    mod = types.ModuleType("ssl", "l4proxy: no TLS in the sidecar (see l4proxy.sidecar.lean)")

    class SSLError(OSError):
        pass

    names = ("SSLWantReadError", "SSLWantWriteError", "SSLSyscallError", "SSLZeroReturnError")
    for name in names:
        setattr(mod, name, type(name, (SSLError,), {}))
    mod.SSLError = SSLError  # type: ignore[attr-defined]
    mod.CertificateError = type("CertificateError", (ValueError,), {})  # type: ignore[attr-defined]

    def no_tls(*args: Any, **kwargs: Any) -> Any:
        raise NoTLSError("l4proxy's sidecar runs without TLS (OpenSSL is not loaded)")

    mod.SSLContext = type("SSLContext", (), {"__init__": no_tls})  # type: ignore[attr-defined]
    mod.MemoryBIO = type("MemoryBIO", (), {"__init__": no_tls})  # type: ignore[attr-defined]
    mod.create_default_context = no_tls  # type: ignore[attr-defined]
    # the values of CPython's ssl module (OpenSSL's SSL_ERROR_*)
    mod.SSL_ERROR_WANT_READ = 2  # type: ignore[attr-defined]
    mod.SSL_ERROR_WANT_WRITE = 3  # type: ignore[attr-defined]
    mod.SSL_ERROR_SYSCALL = 5  # type: ignore[attr-defined]
    return mod


def import_uvloop() -> Any:
    """``import uvloop``, without OpenSSL when the process kept it out."""
    if sys.modules.get("ssl", "") is not None or "uvloop" in sys.modules:
        import uvloop  # ssl is (or may be) the real one

        return uvloop
    stand_in = sys.modules["ssl"] = _stand_in()
    try:
        import uvloop
    except (AttributeError, TypeError) as exc:  # a uvloop that wants more of ssl
        log.info("uvloop needs the ssl module (%s): loading OpenSSL", exc)
        for name in OPENSSL_MODULES:
            sys.modules.pop(name, None)
        import uvloop

        return uvloop
    finally:
        if sys.modules.get("ssl") is stand_in:
            sys.modules["ssl"] = None  # type: ignore[assignment]
    return uvloop


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker starts with: *environ*, plus one malloc
    arena, and malloc for every object (not pymalloc's arenas)."""
    env = dict(environ)
    env.setdefault("MALLOC_ARENA_MAX", "1")
    env.setdefault("PYTHONMALLOC", "malloc")
    return env


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None where the C library has none (musl)."""
    try:
        import ctypes

        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return None
    return trim


def give_back_memory() -> bool:
    """Return to the kernel what the interpreter and malloc keep of freed memory.

    Empties CPython's free lists, which only a full collection does, without
    examining the heap: every object is frozen first, so the collection looks
    at none (cyclic garbage is left to the automatic collector, whose next
    oldest-generation pass is then a full one: see the module docstring). Then
    ``malloc_trim(0)`` gives glibc's free heap pages back. Returns whether
    malloc_trim was there to call.
    """
    gc.freeze()
    try:
        gc.collect()
    finally:
        gc.unfreeze()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


# expansions between two full passes over the whole heap (see the docstring)
FULL_PASS_EVERY = 16
_expansions = 0


def collect_unfrozen() -> None:
    """Before a table is made in a thread (the collector running): a full
    collection of what is not frozen, the heap unfrozen first every
    FULL_PASS_EVERY calls (see the module docstring)."""
    global _expansions
    _expansions += 1
    if _expansions % FULL_PASS_EVERY == 0:
        gc.unfreeze()
    gc.collect()


def freeze_new_table() -> None:
    """Once a table is made in a thread, the collector still paused:
    every object so far frozen (the table with them), its passes never to
    examine them (see the module docstring)."""
    gc.freeze()


M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter (malloc.h)
LARGE_ALLOCATION = 1 << 20


def map_large_allocations() -> bool:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, 1 MiB)``: each allocation of a
    MiB or more mapped on its own, returned to the kernel when freed (see
    the module docstring: a /stats page). False where the C library has no
    mallopt (musl) or refused it."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION))

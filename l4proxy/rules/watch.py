"""Watch the rule path(s) and reload on change (poll) or on demand (SIGHUP).

Theory of operation
-------------------
Every ``interval`` seconds the watcher takes a *fingerprint* of the rule
paths: for a file its resolved path, device, inode, size, mtime, ctime,
mode and owner; for a directory the same for each visible
``*.yaml``/``*.yml``/``*.json`` entry, following symlinks. A Kubernetes
ConfigMap mount swaps the ``..data`` symlink atomically, which changes the
resolved paths and inodes, so a swap is seen even when sizes and times
repeat.

On a change the watcher waits until the newest mtime or ctime of the files
is ``settle`` seconds old (1 s for a sidecar), then fingerprints again; it
loads only when two fingerprints agree, so a file caught mid-write is read
once the writer is done, if it pauses for less than that. A writer should
write a temporary file and rename it over the rule file (``l4proxy
create|replace`` do, and so does the kubelet): a reader never sees half of
it. It fingerprints once more after the load: files
that changed while they were read (a ``..data`` swap between two of them)
may have given a mix of old and new, which is dropped, neither served nor
reported, and loaded again.

A load that fails is refused, file by file where it can be (Istio validates
each object: a bad one never enters its store, and the rest goes live).
Where every error is in some files read
(:meth:`RuleWatcher._parse_refused`), the same texts are loaded again with
each of those files *held*: at its last good text, the one it had in the
table served (kept after every swap: :mod:`~l4proxy.rules._last_good`), or
left out where it had none (a new file). If that loads, it goes live: the
other files' changes are served, a canary's rollback in its own file among
them, while the held files' errors are reported as any refused load's (the
log, file and line, ``/config_dump``'s ``last_error``,
``l4proxy_rules_valid`` 0, ``l4proxy_reload_failures_total``; the log line
of a held file says the size and mtime of the version served), and
``/config_dump``'s ``held`` and ``l4proxy_rules_files_held`` /
``l4proxy_rules_file_held{file}`` say which files are held and what is
served for each (a file's series is 0 once it loads as it is, and dropped
once it is deleted). Where holding them leaves the files served as they
are (a broken file beside no other change), no new table is made: the
generation and digest stay, and the log says "keeping generation N" as
before. The last good table is kept whole where a path
cannot be read (missing, a directory that cannot be listed, a file that
cannot be opened: ConfigUnreadable, tried again after RETRY_FIRST seconds,
doubling), where an error is of no file, where the held combination is
refused too (a route moved to a new file while the old one is broken:
twice in the combination), where it would lose an object the table served
has (kind, namespace and name: a file renamed with a typo, an object moved
from a valid file into a new broken one; left out, it was served by
neither its old version nor its new one, and the log names each such
object and the file it was served from), where it would send requests to
a host that no ServiceEntry describes and the table served did not (a
route's share, an Ingress backend: the loader's warnings of reason
UNRESOLVED; a ServiceEntry added in a file saved with an error, beside the
route that sends it a share: the held file may be what describes that
host, and served without it that share failed), and where nothing would
be left to serve (every file held, none with a last good text): Istio
#5204, istio/api #586, a half-applied or invalid config took hosts down. An
object deleted on purpose beside a broken file goes so too: it stays
served until the broken file is fixed. A held file is served as it was or
not at all, never half of its change: within a file a change applies
whole or not at all. It stays held until it is fixed or deleted (deleted,
its rules go with it).

A process's first load that has no last good text at all, its own or
shared (a sidecar starting, every worker at its first load), holds
nothing back: it is refused whole (:class:`StartRefused`), and the sidecar
is not ready until the files load as they are. Left out there, the new pod
went ready routing without the broken file beside pods that serve its
last good version (a fleet split). A first load with the texts the other
workers serve (a worker restarted within a running sidecar) serves what
they serve: the held combination where it loses none of their objects,
else their texts whole, so that it agrees with workers that keep their
whole last good table (and, where a path cannot be read, tries again as
they do). One that found nothing shared where they have served (the
memory file damaged) loads again once they have written it again
(:meth:`RuleWatcher._check_shared`).

A reload is parsed and compiled off the accept path: in a thread
(:meth:`RuleWatcher.reload`), while the event loop keeps accepting and
serving; only the swap (one assignment of ``state.table``) runs on the loop.
The thread is a daemon of its own, not the default executor's: a load stuck
in the kernel (an open() on a hung NFS or FUSE mount) must not keep the
worker from exiting, and asyncio.run joins the executor's threads. A load
not done within ``load_deadline`` seconds is reported as a failure (the last
good table keeps serving, and the cyclic GC, paused for the parse, runs
again); no other load starts while its thread is still in it, and once it
ends (its result is dropped) the rules are loaded afresh.
The worker reads the table once per connection, *after* the request head is
complete, so a head that arrives after a swap is routed by the new rules.

ServiceEntry endpoints given as host names (``resolution: DNS``) are resolved
by :class:`~l4proxy.rules.dns.DnsEndpoints` in a second task: the loaded table is
kept as the *base*, and what the worker routes on (``state.table``) is the base
with each resolved name replaced by its addresses. A reload re-expands the new
base with the addresses already known (no regression to names), and a DNS
change swaps in a re-expanded table without touching ``generation`` (that
counts rule loads; ``dns_updates`` counts DNS swaps). Both expansions are
made in a thread, as a parse is (a big table's copy took 0.6 s of the
loop at each DNS change), one DNS expansion at a time, and ordered by
generations of answers (see :meth:`RuleWatcher._expand_dns`): a DNS table
of a base a reload has replaced is dropped, and a reload's table whose
answers changed while it was made is made again. Both swaps replace the
whole table at once, on the loop, between two connections' decisions. The names a reload
adds are looked up before its table goes live, the old table serving
meanwhile, for one query's timeout at most (see
:meth:`RuleWatcher._first_lookups`: Envoy's cluster warming); the first load,
at start, has no table to keep serving and goes live at once, and ``/ready``
waits for its names' first lookups instead.

Which files a table came from is its ``digest``: a hash of the fingerprint
they were loaded at, a held file counted at the entry of the version
served (left out: not at all; see :func:`served_fingerprint`).
``generation`` counts one process's loads and starts again at 1 in a
worker that is restarted; the digest is the same in every worker that
serves the same files at the same versions, so "the change is live" is
"every worker has a digest, the same one, other than before the change"
(see :class:`l4proxy.stats.RulesMark`): a change beside a broken file moves
it, a change refused in its own file beside no other change does not. A
worker restarted while a file is broken takes that file's last good text
from the memory file its supervisor shares with every worker (see
:mod:`~l4proxy.rules._last_good`), so the workers still agree, and its
first load is not refused where those texts make the files load; a sidecar
started while a file is broken has none, and is not ready until it loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from l4proxy.rules import (
    UNRESOLVED,
    ConfigError,
    ConfigUnreadable,
    Diagnostic,
    LoadResult,
    ObjectSummary,
    load_rules,
)
from l4proxy.rules._last_good import FileEntry, LastGood, Texts
from l4proxy.rules._loader import RuleFiles, read_rules
from l4proxy.rules.dns import (
    DnsEndpoints,
    NameState,
    Resolution,
    Resolver,
    answers_of,
    resolved_table,
    ttl_bounds_from_env,
)
from l4proxy.rules.routing import RouteTable
from l4proxy.sidecar.lean import collect_unfrozen, freeze_new_table
from l4proxy.stats import Counters

log = logging.getLogger("l4proxy.rules")

RULE_SUFFIXES = (".yaml", ".yml", ".json")
# Each entry: (path as found, path as resolved, st_dev, st_ino, st_size,
# st_mtime_ns, st_ctime_ns, st_mode, st_uid); see _last_good.FileEntry
Fingerprint = tuple[FileEntry, ...]
# The objects of a table by (kind, namespace, name): the file each came from
ServedObjects = dict[tuple[str, str, str], str | tuple[str, ...]]
# A warning of reason UNRESOLVED as compared between two loads: the kind and
# name of its object, and its message (the host it names), not its file
# and line (an object moved, a line added above it)
Unresolved = tuple[str | None, str | None, str]
_GONE = (-1, -1, -1, -1, -1, -1, -1)
# Seconds a reload may take before it is reported as stuck: 2,000 + 2,000
# objects parse in 1-3 s.
DEFAULT_LOAD_DEADLINE = 30.0
# Seconds a fingerprint (a stat of each rule file) may take: on a hung mount
# it never ends, and it is taken off the loop so that the loop does not hang
# with it (the watchdog would kill the worker, and its successor would hang
# at the same place).
FINGERPRINT_DEADLINE = 10.0
LOAD_THREAD = "l4proxy-rules"
HELD = "l4proxy_rules_files_held"
FILE_HELD = "l4proxy_rules_file_held"
STAT_THREAD = "l4proxy-rules-stat"  # see RuleWatcher._stat()
LAST_GOOD_THREAD = "l4proxy-rules-last-good"  # see RuleWatcher._check_shared()
EXPAND_THREAD = "l4proxy-rules-dns"  # see RuleWatcher._expand_dns()
# A reload's expansion is made again where DNS answers changed while it was
# made, this many times at most; then it goes live, and the newest answers
# are expanded into it after (see RuleWatcher._expanded).
EXPAND_TRIES = 3

T = TypeVar("T")


# A load that could not read the files (EACCES, EIO, EMFILE: a worker at its
# fd limit) is tried again after RETRY_FIRST seconds, doubling to RETRY_MAX,
# until one reads them: what fixes it (an ACL, a mount back, fds freed)
# may leave every stat of the files as it was, and waiting for the next change
# served the old rules until then.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


async def woken(event: asyncio.Event, timeout: float | None) -> None:
    """Until *event* is set or *timeout* seconds have passed. Not
    asyncio.wait_for: in Python 3.11 it swallows a cancel that comes in the
    loop turn the event is set (a SIGHUP as the worker stops), and the task
    that should have ended loops on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def in_a_daemon_thread(fn: Callable[[], T], name: str = LOAD_THREAD) -> asyncio.Future[T]:
    """*fn* run in a daemon thread of its own; its outcome, on the running loop.

    Not asyncio.to_thread: asyncio.run waits for the default executor's
    threads on its way out (and concurrent.futures joins them at interpreter
    exit), so a load stuck in open() on a hung mount kept the worker from
    exiting after SIGTERM. Nothing waits for this thread.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():  # its waiter was cancelled (stop())
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        value: Any
        try:
            ok, value = True, fn()
        except ConfigError as exc:  # (a refusal: see bare)
            ok, value = False, bare(exc)
        except Exception as exc:
            ok, value = False, exc
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


E = TypeVar("E", bound=BaseException)


def bare(error: E) -> E:
    """*error* without its traceback and the exceptions it was raised in: a
    refusal kept (Loaded.refused) or handed from the load's thread. Its
    traceback's frames hold what the parse read, every file's text, and
    one of them holds the refusal itself: a cycle, freed by a full
    collection only, which the worker puts off (it freezes what it has
    before it collects: l4proxy.sidecar.lean). A ConfigError says all it
    has to say in its diagnostics."""
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


def _expand_without_gc(base: RouteTable, states: Mapping[str, NameState]) -> RouteTable:
    """:func:`resolved_table` with the cyclic garbage collector paused (in
    a thread), as a reload's parse is (see
    :meth:`RuleWatcher._parse_without_gc`): the objects of a big table's
    copy triggered full collections of the whole heap, the GIL held through
    each. Measured with 54,000 endpoint entries: the loop's longest stall
    over a DNS change 176 ms with the collector running, 37 ms paused (what
    is left: one young-generation pass over the new table once it runs
    again). A table forms no cycles: reference counting frees the one it
    replaces. The table is prepared here too (RouteTable.prepare): what
    the worker's swap hooks read of it, which they computed on the loop.
    That young pass (made in this thread, where it ran again, the GIL held:
    56-160 ms with 54,000 entries) and the middle and full ones that
    followed as the table aged are gone too: the heap is frozen with the
    new table in it (l4proxy.sidecar.lean: collect_unfrozen before,
    freeze_new_table after)."""
    was_enabled = gc.isenabled()
    if was_enabled:
        collect_unfrozen()
    gc.disable()
    try:
        table = resolved_table(base, states).prepare()  # (what the swap's hooks read)
        if was_enabled:
            freeze_new_table()  # no pass of the collector over it (lean)
        return table
    finally:
        if was_enabled:
            gc.enable()


def fingerprint(paths: Sequence[str]) -> Fingerprint:
    """What the rule files are, as stat sees them. The ctime is there for
    what leaves the mtime as it was: a rewrite in place that puts the mtime
    back (cp -p, rsync -t --inplace, touch -r), a chmod or chown that makes
    an unreadable file readable (mode and owner are there too)."""
    items: list[FileEntry] = []

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            items.append((path, path, *_GONE))
            return
        items.append(
            (
                path,
                os.path.realpath(path),
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_mode,
                st.st_uid,
            )
        )

    for p in paths:
        if os.path.isdir(p):
            try:
                names = sorted(os.listdir(p))
            except OSError:
                items.append((p, p, *_GONE))
                continue
            for name in names:
                if not name.startswith(".") and name.endswith(RULE_SUFFIXES):
                    add(os.path.join(p, name))
            # Not the directory's own mtime: it changes with every hidden temp
            # file of an atomic write and with `l4proxy canary`'s state file,
            # and each would reload unchanged rules and move the generation
            # (a canary waiting for its document to go live took that for
            # it). Files added, removed, replaced or re-pointed (a ConfigMap
            # ..data swap) all show in the entries above.
        else:
            add(p)
    return tuple(items)


def fingerprint_digest(fp: Fingerprint) -> int:
    """A fingerprint as a number for ``/stats`` (48 bits: exact in a float,
    as Prometheus carries values). Every process that stats the same files
    gets the same one."""
    return int.from_bytes(hashlib.blake2b(repr(fp).encode(), digest_size=6).digest(), "big")


def served_fingerprint(fp: Fingerprint, held: Mapping[str, FileEntry | None]) -> Fingerprint:
    """*fp* as served with the files of *held* held back: each at the entry
    of its version served, or left out where that is None. The digest of
    what a table serves: a held file counts as the version it serves, not as
    the file on disk, so a change refused in one file leaves the digest as
    it was where nothing else changed."""
    out: list[FileEntry] = []
    for entry in fp:
        if entry[0] not in held:
            out.append(entry)
        elif (version := held[entry[0]]) is not None:
            out.append(version)
    return tuple(out)


class StartRefused(ConfigError):
    """A first load whose errors are all in some files, with no last good
    version of any file to be had: not the worker's own (it has loaded
    none) nor its supervisor's shared ones (none written: every worker is
    starting). Refused whole, as a first load was before per-file loading:
    the sidecar is not ready until the files load as they are."""

    def __init__(self, refused: ConfigError, files: Sequence[str]) -> None:
        self.files = list(files)
        self.why = (
            f"{', '.join(self.files)} not left out: no version of the rule files has "
            "loaded in this sidecar yet (a sidecar starting), and a pod ready without "
            "a broken file routes otherwise than the pods that serve its last good "
            "version; not ready until the files load as they are"
        )
        super().__init__(refused.diagnostics, refused.documents)

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.why}"


@dataclass(frozen=True)
class HeldFile:
    """A rule file whose text as it is was refused, in a table that serves
    the other files as they are: what is served for it."""

    path: str
    errors: tuple[str, ...]  # its errors, as the log says them
    # the fingerprint entry of its version served (the last good); None: left out
    served: FileEntry | None

    def to_json(self) -> dict[str, Any]:
        last = self.served
        return {
            "file": self.path,
            "served": "last good version" if last is not None else "none (left out)",
            "last_good": None
            if last is None
            else {"path": last[1], "size": last[4], "mtime": last[5] / 1e9},
            "errors": list(self.errors),
        }


@dataclass
class Loaded:
    """What one load made of the rule files (off the loop, in
    :meth:`RuleWatcher._parse`), for :meth:`RuleWatcher._take` to serve or
    refuse (on the loop)."""

    # the table to serve; None: nothing new to serve (the files held back
    # leave the files served as they are), or the held combination was
    # refused too (fallback_refused)
    result: LoadResult | None
    served: Fingerprint  # the files the table is of (see served_fingerprint)
    texts: Texts  # their texts as served, for LastGood
    held: list[HeldFile] = field(default_factory=list)
    refused: ConfigError | None = None  # the files as they are: refused for this
    fallback_refused: ConfigError | None = None  # the held combination: refused for this
    # the held combination loads but would lose these objects the table
    # served has, each said with where it was served from (see _gone)
    gone: list[str] = field(default_factory=list)
    # the held combination loads but would send requests to hosts that no
    # ServiceEntry describes where the table served did not: these warnings
    unresolved: list[Diagnostic] = field(default_factory=list)
    # the other workers' texts, loaded whole (a first load: _parse_shared)
    shared: bool = False


@dataclass
class RuleState:
    """What the sidecar serves from, and how it got there."""

    table: RouteTable
    generation: int = 0
    digest: int = 0  # fingerprint_digest of the files the table came from (0: none loaded)
    loaded_at: float = field(default_factory=time.time)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: int = 0  # of notes, the warnings (l4proxy_rules_warnings)
    last_error: str | None = None
    last_error_at: float | None = None
    reloads: int = 0
    reload_failures: int = 0
    dns: DnsEndpoints | None = None
    dns_updates: int = 0
    # the rule files whose text as it is was refused at the last load, each
    # served at its last good version or left out (/config_dump's held)
    held: list[HeldFile] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "digest": self.digest,
            "loaded_at": self.loaded_at,
            "sources": self.sources,
            "notes": self.notes,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "held": [h.to_json() for h in self.held],
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "dns_updates": self.dns_updates,
            "dns": self.dns.to_json() if self.dns else [],
            "table": self.table.to_json(),
        }


class RuleWatcher:
    def __init__(
        self,
        paths: Sequence[str],
        namespace: str = "default",
        domain: str = "cluster.local",
        interval: float = 1.0,
        settle: float | None = None,
        on_swap: Callable[[RuleState], None] | None = None,
        *,
        resolver: Resolver | None = None,
        dns_min_ttl: float | None = None,
        dns_max_ttl: float | None = None,
        counters: Counters | None = None,
        seed: int | None = None,
        load_deadline: float = DEFAULT_LOAD_DEADLINE,
        dns_warm_timeout: float | None = None,
        last_good_fd: int | None = None,
        pod_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.namespace = namespace
        self.domain = domain
        # this pod's labels (--pod-labels): which DestinationRules of a
        # workloadSelector apply (load_rules); None: not known
        self.pod_labels = None if pod_labels is None else dict(pod_labels)
        self.interval = interval
        # How long the files must have been still before they are loaded:
        # a writer that pauses longer between two writes (a generator, scp,
        # kubectl cp) had a half-written file loaded. None: the interval,
        # within 0.1..1 s (so 1 s for a sidecar; 0.1 at the tests' 0.05).
        self.settle = max(0.1, min(1.0, interval)) if settle is None else settle
        self.on_swap = on_swap
        # Counters the worker shows in /stats (it adopts them: see sidecar/run.py).
        self.counters = counters or Counters()
        self.counters.describe(
            HELD,
            "gauge",
            "Rule files whose text as it is was refused, served at their last good version "
            "or left out while the other files load (/config_dump's held).",
        )
        self.counters.describe(
            FILE_HELD,
            "gauge",
            "1 while the rule file is served at its last good version or left out (its "
            "text as it is refused), 0 once it loads as it is; dropped once it is deleted.",
            labelled=True,
        )
        # The text of each file served, for a load that finds one broken;
        # *last_good_fd*: the memory file the supervisor shares with every
        # worker (see _last_good).
        self.last_good = LastGood(last_good_fd)
        env_min, env_max = ttl_bounds_from_env()
        self.dns = DnsEndpoints(
            resolver or Resolver(),
            min_ttl=env_min if dns_min_ttl is None else dns_min_ttl,
            max_ttl=env_max if dns_max_ttl is None else dns_max_ttl,
            counters=self.counters,
        )
        # How long a reload waits for the first lookups of the DNS names it
        # adds (see _first_lookups); None: one query's timeout.
        self.dns_warm_timeout = dns_warm_timeout
        # --seed: every table this watcher publishes gets its RNG seeded with
        # it, so weighted choices repeat run after run (tests); None: OS entropy.
        self.seed = seed
        # Called with each table right after it goes live (on the loop):
        # whoever caches what the table answered forgets it here.
        self.on_publish: list[Callable[[RouteTable], None]] = []
        # Called (on the loop) after each reload, whether it loaded or was
        # refused: a parse frees several times the table it builds (the worker
        # gives that memory back here: see l4proxy.sidecar.lean.give_back_memory).
        # Not after a DNS swap: it frees one table's copy, no parse.
        self.after_load: Callable[[], object] | None = None
        self.reloading = False  # a reload is being parsed in a thread
        self.load_deadline = load_deadline
        # A load past its deadline whose thread is still in it: while it is,
        # no other starts (each would leave one more thread stuck there).
        self.stuck: asyncio.Future[Loaded] | None = None
        self._stat_stuck: asyncio.Future[Fingerprint] | None = None  # see _stat()
        self._late_tasks: set[asyncio.Task[None]] = set()
        self.state = RuleState(table=RouteTable.empty(), dns=self.dns)
        self.base = self.state.table  # as loaded: DNS endpoints still host names
        # the objects of the table served (see served_objects): a held
        # combination that would lose one is not served (see _parse_held)
        self.served_objects: ServedObjects = {}
        # its warnings of reason UNRESOLVED: a held combination with one
        # that is not among them is not served (see _parse_held)
        self.served_unresolved: frozenset[Unresolved] = frozenset()
        self._fingerprint: Fingerprint | None = None
        self._retry_in = RETRY_FIRST  # the wait before the next try of an unreadable load
        self._retry_at: float | None = None  # time.monotonic() of that try; None: none due
        self._wake = asyncio.Event()
        self._dns_wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dns_task: asyncio.Task[None] | None = None
        # DNS answers by generation (see _expand_dns): _answers counts the
        # changes the DNS task made to the names' addresses, _live_answers is
        # the count the table live was expanded with (on the loop, both).
        self._answers = 0
        self._live_answers = 0
        self._expander: asyncio.Task[None] | None = None  # see _expand_dns
        self.expanding = False  # a DNS change is being expanded into the table, in a thread
        self._stopping = False  # stop() began: no expansion starts any more
        self._warmed = False  # see warmed()

    def load_now(self) -> bool:
        """Load synchronously; swap on success. Returns True if swapped.

        For startup (nothing is accepted yet) and tests. While serving, the
        watcher reloads with :meth:`reload`, which parses off the loop.
        """
        fp = self._fingerprint = fingerprint(self.paths)
        try:
            loaded = self._parse(fp)
        except ConfigError as exc:
            bare(exc)
            self._reject(str(exc), _errors_of(exc))
            self._retry_later(exc)
            return False
        except Exception as exc:  # a loader bug: see _reject_bug
            self._reject_bug(exc)
            return False
        return self._take(loaded)

    async def reload(self, fp: Fingerprint | None = None) -> bool:
        """Parse and compile the rules in a thread, then swap on the loop.

        Parsing 2,000 ServiceEntries and 2,000 RouteRules takes about a
        second of pure Python. Run on the loop, it stopped every accept and
        every head being read for that long (issue 12: 1.7 s on each reload).
        In a thread the loader still holds the GIL, but CPython hands it over
        every ``sys.getswitchinterval()`` (5 ms) and at every blocking call,
        so the loop keeps accepting and serving between the loader's
        bytecodes; the new table is built entirely on the thread and is not
        seen by the loop until :meth:`_swap` replaces ``state.table`` in one
        assignment, on the loop, between two connections' decisions. Reloads
        are serialized: only the :meth:`_run` task calls this. *fp*: the
        files' fingerprint, when the caller has just taken it.
        """
        if self.stuck is not None:
            return False  # reported already; a reload follows once it ends
        if fp is None:  # (_run passes the one it has just taken twice)
            fp = await self._stat()
            if fp is None:
                return False  # the files cannot be looked at: logged
        self._fingerprint = fp
        self.reloading = True
        loaded: Loaded | None = None
        error: Exception | None = None
        collecting = gc.isenabled()  # what to restore if the load is stuck
        read_at = fp  # (the thread's own name for it)
        parse = in_a_daemon_thread(lambda: self._parse_without_gc(read_at))
        try:
            async with asyncio.timeout(self.load_deadline):  # (see woken)
                loaded = await asyncio.shield(parse)
        except TimeoutError:
            self._stuck(parse, collecting, fp)
            self._loaded()
            return False
        except asyncio.CancelledError:
            parse.cancel()  # stop(): what the thread makes, if it ends, is dropped
            raise
        except ConfigError as exc:  # (re-raised here with this frame: see bare)
            error = bare(exc)
        except Exception as exc:
            error = exc
        finally:
            self.reloading = False
        if await self._stat() != fp:
            # The files changed while they were read (a ConfigMap's ..data
            # swapped between two of them): what was read may be half old,
            # half new, valid or not. Neither served nor reported: the
            # watcher loads them again once they settle.
            log.info("rules changed while they were loaded; loading them again")
            self.request_reload()
            loaded = error = None
        elif isinstance(error, ConfigError):
            self._reject(str(error), _errors_of(error))
            self._retry_later(error)
        elif error is not None:  # a loader bug: see _reject_bug
            self._reject_bug(error)
        swapped = False
        if loaded is not None:
            result = loaded.result
            first = await self._first_lookups(result.table) if result else None
            expanded = await self._expanded(result.table, first) if result else None
            swapped = self._take(loaded, first, expanded)  # the previous table is dropped here
        self._loaded()
        return swapped

    async def _first_lookups(
        self, table: RouteTable
    ) -> dict[str, tuple[Resolution | Exception, float]]:
        """The first lookup of each DNS endpoint name *table* adds, before it
        goes live (Envoy warms a new cluster so): put live at once, such a
        name was its own endpoint until the DNS task's lookup landed, and the
        per-request relay answered its requests 503 ``no healthy upstream``
        meanwhile. The table live now keeps serving while they are looked up
        (on the loop, as the DNS task's), for one query's timeout at most
        (``first_lookup_bound``): a name not answered by then goes live
        unresolved, as before, and is looked up again at once. The watch
        does not poll meanwhile: a change or a SIGHUP that comes is loaded
        after this table, as any that comes during a parse."""
        names = self.dns.new_names(table)
        if not names:
            return {}
        within = self.dns_warm_timeout
        started = time.monotonic()
        try:
            if within is None:  # (reads resolv.conf: inside the guard)
                within = self.dns.first_lookup_bound()
            got = await self.dns.first_lookups(names, within)
        except Exception:  # a resolver bug: the names are looked up after the swap
            log.exception("unexpected error while looking up the rules' new DNS names")
            return {}
        took = time.monotonic() - started
        late = [name for name in names if name not in got]
        if late:
            log.warning(
                "rules: %d of %d new DNS endpoint name(s) not answered within %.3g s (%s); "
                "they go live unresolved and are looked up again",
                len(late),
                len(names),
                within,
                ", ".join(late[:5]) + (", ..." if len(late) > 5 else ""),
            )
        else:
            log.info("rules: %d new DNS endpoint name(s) looked up in %.3f s", len(names), took)
        return got

    def _stuck(self, parse: asyncio.Future[Loaded], collecting: bool, fp: Fingerprint) -> None:
        """A load past its deadline: say so, and let the collector run again
        (the parse paused it for the whole process, and may never end). If it
        ends, what it loaded goes live when the files are still as it found
        them (a slow load, not a stuck one), else they are loaded again."""
        self.stuck = parse
        if collecting:
            gc.enable()
        self._reject(
            f"the rules were not loaded within {self.load_deadline:g} s (is reading "
            f"{', '.join(self.paths)} hung? an NFS or FUSE mount, a file that blocks?); "
            "the next load starts when this one ends"
        )

        async def ended_late(done: asyncio.Future[Loaded]) -> None:
            # (stuck is cleared whatever happens here: left set, every later
            # reload returned at once, and the rules were never loaded again)
            try:
                late = not done.cancelled() and done.exception() is None
                if late and await self._stat() == fp:
                    log.warning("a load of the rules ended after its deadline")
                    loaded = done.result()
                    result = loaded.result
                    first = await self._first_lookups(result.table) if result else None
                    expanded = await self._expanded(result.table, first) if result else None
                    self._take(loaded, first, expanded)
                    self._loaded()
                else:
                    log.warning("a load of the rules past its deadline ended; loading them again")
                    self.request_reload()
            except Exception:
                log.exception("unexpected error while loading rules; loading them again")
                self.request_reload()
            finally:
                self.stuck = None

        def ended(done: asyncio.Future[Loaded]) -> None:
            task = asyncio.ensure_future(ended_late(done))
            self._late_tasks.add(task)
            task.add_done_callback(self._late_tasks.discard)

        parse.add_done_callback(ended)

    async def _stat(self) -> Fingerprint | None:
        """:func:`fingerprint`, in a thread: a stat on a hung mount (NFS,
        FUSE) never returns, and on the loop it would stop the worker. None
        while one is stuck (logged once); a later call tries again once it
        has ended. 2,000 files take some 40 ms, also better off the loop."""
        if self._stat_stuck is not None:
            if not self._stat_stuck.done():
                return None
            self._stat_stuck = None
        paths = list(self.paths)
        look = in_a_daemon_thread(lambda: fingerprint(paths), STAT_THREAD)
        try:
            async with asyncio.timeout(FINGERPRINT_DEADLINE):  # (see woken)
                return await asyncio.shield(look)
        except TimeoutError:
            self._stat_stuck = look
            log.warning(
                "the rule files could not be looked at within %g s (%s: a hung mount?); "
                "changes to them are not seen until that ends",
                FINGERPRINT_DEADLINE,
                ", ".join(paths),
            )
            return None

    async def _check_shared(self) -> None:
        """The shared memory file of last good texts is not as this worker
        last saw it, or a write of its own is due: checked in a thread
        (:meth:`LastGood.check`: written again where it holds no complete
        version). Where it holds a version this worker had not seen and its
        first load was refused (a worker restarted while the file was
        damaged: no last good text to be had), the rules are loaded again."""
        try:
            fresh = await in_a_daemon_thread(self.last_good.check, LAST_GOOD_THREAD)
        except Exception:  # a bug: the next poll looks again
            log.exception("unexpected error while checking the rules' shared last good versions")
            return
        if fresh and self.state.generation == 0:
            log.info("rules: the other workers' last good versions are there now; loading again")
            self._fingerprint = None

    def _still_for(self, fp: Fingerprint) -> float:
        """How much longer to wait before the files in *fp* have been still
        for ``settle`` seconds, counted from their newest mtime or ctime (a
        change seen late loads at once; one seen early waits the rest)."""
        # (e[2] st_dev, -1 for a path gone; e[5], e[6] its mtime and ctime)
        changed = max((max(e[5], e[6]) for e in fp if e[2] != -1), default=0) / 1e9
        age = time.time() - changed
        if age < 0:  # a time from the future (another clock: NFS): count from now
            return self.settle
        return max(0.0, self.settle - age)

    def _loaded(self) -> None:
        if self.after_load is not None:
            try:
                self.after_load()
            except Exception:  # never a reason to stop reloading
                log.exception("after-load hook failed")

    def _parse(self, fp: Fingerprint) -> Loaded:
        """Read, parse and compile the rule files, which *fp* describes (off
        the loop: no shared state touched; the last good texts are read).
        Where they do not load as they are, see :meth:`_parse_refused`."""
        read = read_rules(self.paths, read_pipes=False)
        entries = {e[0]: e for e in fp}
        try:
            result = load_rules(
                self.paths,
                namespace=self.namespace,
                domain=self.domain,
                read=read,
                pod_labels=self.pod_labels,
            )
        except ConfigError as exc:
            refused = bare(exc)  # (kept in Loaded)
        else:
            return Loaded(result, fp, _texts_of(read, entries))
        return self._parse_refused(read, refused, fp, entries)

    def _parse_refused(
        self,
        read: RuleFiles,
        refused: ConfigError,
        fp: Fingerprint,
        entries: Mapping[str, FileEntry],
    ) -> Loaded:
        """What is served when the files as they are were *refused*.

        Where every error is in a file read (not a path unreadable, a
        directory that cannot be listed, nor an error of no file), the same
        texts are loaded again with each of those files at its last good
        text, or left out where it has none (:meth:`_parse_held`): the
        result says which files are held so, and why. Where that leaves the
        files served as they are (its served digest is the one served now: a
        broken file beside no other change), nothing new is loaded; where it
        is refused too (fallback_refused), where it would lose an object
        the table served has (gone: an object moved into a broken file, a
        file renamed with a typo), or where it would send requests to a host
        no ServiceEntry describes that the table served did not
        (unresolved: a ServiceEntry added in the broken file), the last good
        table keeps serving.

        A process's first load has no table of its own to keep. With no last
        good text at all (a sidecar starting) it is refused
        (:class:`StartRefused` where files are broken); with the texts the
        other workers serve (a worker restarted within a running sidecar),
        it serves what they serve: the held combination where that loses
        none of their objects, else their texts whole (:meth:`_parse_shared`:
        what they keep serving). Raises ConfigError where nothing can be
        served.
        """
        last = self.last_good.get()
        broken = [] if isinstance(refused, ConfigUnreadable) else broken_files(refused, read)
        first = self.state.generation == 0
        if first and not last:
            # Nothing served here yet and nothing shared: a sidecar starting
            # (or a single process). Leaving the broken files out, its pod
            # went ready serving without them beside pods that serve their
            # last good versions; it is refused, as before per-file loading
            # (StartRefused says why where some file would have been left to
            # serve; where none would, the files' errors are the reason).
            left = any(path not in broken for path, _ in read.files)
            raise StartRefused(refused, broken) if broken and left else refused
        shared = self._parse_shared(refused, last, broken) if first else None
        if broken:
            if shared and shared.result:
                objects = served_objects(shared.result.documents)
                unresolved = unresolved_of(shared.result.notes)
            else:
                objects, unresolved = self.served_objects, self.served_unresolved
            loaded = self._parse_held(read, refused, broken, fp, entries, last, objects, unresolved)
            if loaded is not None and (loaded.result is not None or shared is None):
                return loaded
        if shared is not None:
            return shared
        raise refused  # no file left to serve, or unreadable: nothing of them is

    def _parse_held(
        self,
        read: RuleFiles,
        refused: ConfigError,
        broken: list[str],
        fp: Fingerprint,
        entries: Mapping[str, FileEntry],
        last: Texts,
        objects: ServedObjects,
        unresolved: frozenset[Unresolved],
    ) -> Loaded | None:
        """:meth:`_parse_refused`'s second try: *read* with each file of
        *broken* at its last good text in *last*, or left out; None where no
        file would be left. *objects*: those of the table served, none of
        which the combination may lose; *unresolved*: its warnings of
        reason UNRESOLVED, the only ones the combination may have (one
        more is a share of requests that fails for want of a host a held
        file may describe: a ServiceEntry added there, beside the route)."""
        if all(path in broken and path not in last for path, _ in read.files):
            return None
        held = _held_files(refused, broken, last)
        served = served_fingerprint(fp, {h.path: h.served for h in held})
        texts = _texts_of(read, entries)
        for h in held:
            texts.pop(h.path, None)
            if h.path in last:
                texts[h.path] = last[h.path]
        if fingerprint_digest(served) == self.state.digest:
            return Loaded(None, served, texts, held, refused)  # nothing new to serve
        try:
            result = load_rules(
                self.paths,
                namespace=self.namespace,
                domain=self.domain,
                pod_labels=self.pod_labels,
                read=read.replaced({h.path: last[h.path][1] if h.served else None for h in held}),
            )
        except ConfigError as again:
            return Loaded(None, served, texts, held, refused, bare(again))
        gone = _gone(objects, result.documents, {e[0] for e in fp if e[2] != -1})
        if gone:
            return Loaded(None, served, texts, held, refused, gone=gone)
        new = new_unresolved(result.notes, unresolved)
        if new:
            return Loaded(None, served, texts, held, refused, unresolved=new)
        return Loaded(result, served, texts, held, refused)

    def _parse_shared(self, refused: ConfigError, last: Texts, broken: list[str]) -> Loaded | None:
        """The texts the other workers serve (*last*, as shared, in the order
        of their fingerprint: see :meth:`_swap`), loaded whole, for a first
        load whose files as they are were *refused*: a worker restarted
        while they keep their last good table. None where they do not load
        (they were served: not in this process's namespace and domain)."""
        try:
            result = load_rules(
                self.paths,
                namespace=self.namespace,
                domain=self.domain,
                pod_labels=self.pod_labels,
                read=RuleFiles([(path, text) for path, (_, text) in last.items()]),
            )
        except ConfigError:
            return None
        held = _held_files(refused, broken, last)
        served = tuple(entry for entry, _ in last.values())
        return Loaded(result, served, dict(last), held, refused, shared=True)

    def _parse_without_gc(self, fp: Fingerprint | None = None) -> Loaded:
        """:meth:`_parse` with the cyclic garbage collector paused.

        Measured: parsing 2,000 + 2,000 objects keeps a few hundred thousand
        parser objects alive at once, and the automatic full collections
        they trigger took 150-300 ms each, with the GIL held: the loop stood
        still through them even with the parse in a thread. The loader's
        objects form no cycles (a dropped table leaves nothing to collect;
        see test_rulewatch_reload; a refusal is kept and handed on without
        its traceback, whose frames made one: see bare), so reference
        counting frees them all
        and pausing the collector for the parse costs no memory; the next
        automatic collection sees only the new table (about 40,000 objects,
        5 ms).
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            loaded = self._parse(fingerprint(self.paths) if fp is None else fp)
            table = loaded.result.table if loaded.result is not None else None
            if table is not None and not any(s.resolution == "DNS" for s in table.services()):
                table.prepare()  # (what the swap's hooks read; else its expansion's)
            return loaded
        finally:
            if was_enabled:
                gc.enable()

    def _retry_later(self, error: ConfigError) -> None:
        """After a refused load: an unreadable file is tried again (RETRY_FIRST);
        an invalid one waits for the next change."""
        if not isinstance(error, ConfigUnreadable):
            self._retry_at, self._retry_in = None, RETRY_FIRST
            return
        self._retry_at = time.monotonic() + self._retry_in
        log.info("rules unreadable; trying again in %g s", self._retry_in)
        self._retry_in = min(RETRY_MAX, self._retry_in * 2)

    def _retry_due(self) -> bool:
        return self._retry_at is not None and time.monotonic() >= self._retry_at

    def _reject_bug(self, exc: Exception) -> None:
        """A loader error that is not a ConfigError (a bug of ours): the rule
        set is rejected as an invalid one is, the last good rules keep
        serving, and /config_dump and l4proxy_rules_valid say so. Raised, it
        ended a worker at start-up (a crash loop, the pod never ready), and
        at a reload it went unreported and undid a SIGHUP that came meanwhile."""
        log.error("unexpected error while loading rules (a bug)", exc_info=exc)
        self._reject(f"internal error while loading the rules: {type(exc).__name__}: {exc}")

    def _reject(
        self,
        why: str,
        errors: str | None = None,
        held: Sequence[HeldFile] = (),
        keeping: str | None = None,
    ) -> None:
        """The rules refused for *why* (/config_dump's ``last_error``: the
        loader's errors and warnings); the log says *errors* (those alone,
        where it is a ConfigError's) at ERROR, a line each: the warnings of
        a refused load are of rules that are not served. *held*: the files
        refused, where the others go live beside their last good versions
        (then each line says what is served for its file). *keeping*: what
        is served instead (else the generation kept)."""
        st = self.state
        st.reload_failures += 1
        st.last_error = why
        st.last_error_at = time.time()
        if held:
            for h in held:
                serving = (
                    f"serving {h.path} as last loaded ({_version(h.served)})"
                    if h.served is not None
                    else f"leaving out {h.path} (no version of it was loaded)"
                )
                for line in h.errors:
                    log.error("rules rejected, %s: %s", serving, line)
            return
        if keeping is None:
            keeping = f"keeping generation {st.generation}" if st.generation else "none loaded yet"
        for line in (why if errors is None else errors).splitlines():
            log.error("rules rejected, %s: %s", keeping, line)

    def _take(
        self,
        loaded: Loaded,
        first: Mapping[str, tuple[Resolution | Exception, float]] | None = None,
        expanded: tuple[RouteTable, int] | None = None,
    ) -> bool:
        """Serve what a load made of the files (on the loop); True where a
        table went live. Files held back (see :meth:`_parse`) are refused as
        any invalid load is, errors, counters and all, and the table of the
        others goes live; where they leave the files served as they are,
        the last good table keeps serving and says which files it holds
        back; where that table is refused too, it keeps serving as it was.
        *expanded*: its table with the DNS answers, as :meth:`_expanded`
        made it (None: made here, on the loop)."""
        refused = loaded.refused
        if refused is None:
            assert loaded.result is not None
            self._swap(loaded, first, expanded)
            return True
        self._retry_at, self._retry_in = None, RETRY_FIRST  # (an invalid file waits for a change)
        if loaded.gone:
            self._reject(str(refused), _errors_of(refused))
            log.warning(
                "rules: with %s, %d object(s) served would be gone: %s; the whole last good "
                "table keeps serving (an object moved into a broken file, a file renamed "
                "with an error? fix it)",
                ", ".join(
                    f"{h.path} at its last good version" if h.served else f"{h.path} left out"
                    for h in loaded.held
                ),
                len(loaded.gone),
                "; ".join(loaded.gone[:10]) + ("; ..." if len(loaded.gone) > 10 else ""),
            )
            return False
        if loaded.unresolved:
            self._reject(str(refused), _errors_of(refused))
            log.warning(
                "rules: with %s, %d share(s) of requests would go to a host that no "
                "ServiceEntry describes: %s; the whole last good table keeps serving (a "
                "ServiceEntry in a held file, beside the route that needs it? fix it)",
                ", ".join(
                    f"{h.path} at its last good version" if h.served else f"{h.path} left out"
                    for h in loaded.held
                ),
                len(loaded.unresolved),
                "; ".join(str(d) for d in loaded.unresolved[:10])
                + ("; ..." if len(loaded.unresolved) > 10 else ""),
            )
            return False
        if loaded.shared:  # a first load: what the other workers keep serving
            self._reject(str(refused), _errors_of(refused), keeping="serving the other workers'")
            self._swap(loaded, first, expanded)
            self._retry_later(refused)  # (unreadable: tried again, as they do)
            return True
        if loaded.fallback_refused is not None:
            self._reject(str(refused), _errors_of(refused))
            again = loaded.fallback_refused.errors
            log.warning(
                "rules: with %s at the last good version or left out they are refused too (%s%s)",
                ", ".join(h.path for h in loaded.held),
                again[0] if again else loaded.fallback_refused,
                f", and {len(again) - 1} more" if len(again) > 1 else "",
            )
            return False
        if loaded.result is None:  # nothing new to serve: the table is that already
            self._reject(str(refused), _errors_of(refused))
            self._hold(loaded.held, loaded.served)
            return False
        self._reject(str(refused), _errors_of(refused), loaded.held)
        self._swap(loaded, first, expanded)
        return True

    def _hold(self, held: list[HeldFile], served: Fingerprint) -> None:
        """*held* are the files served at their last good version, or left
        out: /config_dump's held, and l4proxy_rules_files_held and
        l4proxy_rules_file_held{file} in /stats. A file no longer held is 0
        where it is served (*served*: as it is now), and its series dropped
        where it is not (deleted: a series per file name ever broken)."""
        st = self.state
        now = {h.path for h in held}
        there = {e[0] for e in served}
        for h in st.held:
            if h.path in now:
                continue
            if h.path in there:
                self.counters.set(FILE_HELD, 0, file=h.path)
            else:
                self.counters.discard(FILE_HELD, file=h.path)
        for path in now:
            self.counters.set(FILE_HELD, 1, file=path)
        self.counters.set(HELD, len(held))
        st.held = held

    def _swap(
        self,
        loaded: Loaded,
        first: Mapping[str, tuple[Resolution | Exception, float]] | None = None,
        expanded: tuple[RouteTable, int] | None = None,
    ) -> None:
        """Make what *loaded* made the live table (on the loop), with
        *first*, the first lookups of its new DNS names (see
        :meth:`_first_lookups`), recorded before it goes live. *expanded*:
        the table with its DNS names replaced by their addresses, and the
        generation of the answers it was made with (:meth:`_expanded`, in a
        thread); None: made here (:meth:`load_now`, at start, or where the
        thread failed), with the answers as they are."""
        result = loaded.result
        assert result is not None
        st = self.state
        self.base = result.table
        self.served_objects = served_objects(result.documents)
        self.served_unresolved = unresolved_of(result.notes)
        if self.dns.track(self.base):
            self._dns_wake.set()  # (names *first* has no outcome for are due now)
        for name, (outcome, came) in (first or {}).items():
            self.dns.apply(name, outcome, came)  # (its TTL counts from its answer)
        if expanded is not None:
            table, answers = expanded
        elif self.dns.names:
            table, answers = resolved_table(self.base, self.dns.names), self._answers
        else:
            table, answers = self.base, self._answers
        self._publish(table)
        self._live_answers = answers
        self._retry_at, self._retry_in = None, RETRY_FIRST
        st.generation += 1
        st.digest = fingerprint_digest(loaded.served)
        st.reloads += 1
        st.loaded_at = time.time()
        st.sources = list(result.sources)
        before = set(st.notes) if st.generation > 1 else set()
        st.notes = [str(n) for n in result.notes]
        st.warnings = sum(1 for n in result.notes if n.severity == "warning")
        if loaded.refused is None:  # (else _reject has said why, and it stands)
            st.last_error = None
            st.last_error_at = None
        self._hold(loaded.held, loaded.served)
        # (in the order of the fingerprint served: a worker that loads them
        # whole, _parse_shared, gets the same digest)
        texts = loaded.texts
        self.last_good.keep({e[0]: texts[e[0]] for e in loaded.served if e[0] in texts})
        standing = 0
        for note, text in zip(result.notes, st.notes, strict=True):
            # a warning is of a rule not served as written (a route attached
            # to nothing, a revoked grant): WARNING, as --log-level warning
            # shows it, once, when it is new; those the last table had too
            # are counted in one line (this load changed nothing of them); a
            # note (an object skipped) INFO, when it is new
            if text in before:
                standing += note.severity == "warning"
                continue
            level = logging.WARNING if note.severity == "warning" else logging.INFO
            log.log(level, "rules: %s", note)
        if standing:
            log.info(
                "rules: %d warning(s) as in generation %d, not said again (/config_dump's notes)",
                standing,
                st.generation - 1,
            )
        log.info(
            "rules generation %d loaded from %s%s",
            st.generation,
            ", ".join(st.sources) or "-",
            "".join(
                f"; {h.path} at its last good version"
                if h.served is not None
                else f"; {h.path} left out"
                for h in loaded.held
            )
            + ("; as the other workers serve them" if loaded.shared else ""),
        )
        if self.on_swap:
            self.on_swap(st)
        if self._live_answers < self._answers:  # (answers came while it was expanded)
            self._expand_later()

    def _publish(self, table: RouteTable) -> None:
        """Replace the live table in one assignment (seeding its RNG when asked)."""
        if self.seed is not None:
            table.reseed(self.seed)
        self.state.table = table
        for hook in self.on_publish:
            # each hook on its own: one that fails (a bug) must not keep the
            # next from hearing of the table (the relay's stale verdicts,
            # its pools, the outlier state), nor fail the swap itself
            try:
                hook(table)
            except Exception:
                log.exception(
                    "rules: %s failed on the new table", getattr(hook, "__qualname__", hook)
                )

    def request_reload(self) -> None:
        """SIGHUP: reload at once, whether or not the files changed."""
        self._fingerprint = None
        self._wake.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._task = loop.create_task(self._run())
        self._dns_task = loop.create_task(self._run_dns())

    async def stop(self) -> None:
        """Cancel the watch and DNS tasks, a late load's (see :meth:`_stuck`)
        and a DNS expansion, and wait for their end. A cancel a
        task did not take (asyncio.wait_for in Python 3.11 drops one that
        comes in the loop turn its awaited thing completes: a SIGHUP as the
        drain ended left the worker waiting here for ever) is sent again."""
        self._stopping = True
        # (the expander read last: a DNS answer applied while the others
        # were being cancelled may have started one, and none starts after)
        for task in (self._task, self._dns_task, *self._late_tasks, None):
            task = task or self._expander
            while task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            if task is not None and not task.cancelled() and task.exception() is not None:
                log.error("the rules watch had ended", exc_info=task.exception())

    def warmed(self) -> bool:
        """Whether the sidecar may say it is ready as far as DNS goes: every
        name looked up once (:meth:`DnsEndpoints.warmed`) *and* the table
        live expanded with those answers, which is made in a thread after
        they come (:meth:`_expand_dns`): until it goes live the table still
        has the names, whose services the per-request relay answers 503.
        Sticky as DnsEndpoints.warmed is; where no expansion goes live (a
        bug: logged) it waits WARM_WAIT at most, as for a silent server."""
        if not self._warmed and self.dns.warmed():
            self._warmed = self._live_answers >= self._answers or self.dns.warm_wait_over()
        return self._warmed

    async def refresh_dns(self) -> bool:
        """Look up the names that are due; each time answers change something
        (a slow name does not hold the others), a table re-expanded with them
        goes live: made in a thread (:meth:`_expand_dns`), and done by the
        time this returns. True if any name's addresses changed."""
        changed = await self.dns.refresh_due(on_change=self._dns_changed, wake=self._dns_wake)
        if self._live_answers < self._answers:  # (an expansion failed: tried again now)
            self._expand_later()
        task = self._expander
        if task is not None and not task.done():
            await asyncio.wait({task})  # (a cancel of this one leaves it to stop())
        return changed

    def _dns_changed(self) -> None:
        """DNS answers changed some name's addresses (on the loop, as
        :meth:`DnsEndpoints.apply` recorded them): a new generation of
        answers, to be expanded into the table."""
        self._answers += 1
        self._expand_later()

    def _expand_later(self) -> None:
        """Expand the newest answers into the table, in :meth:`_expand_dns`:
        started where it is not under way (where it is, it sees them), and
        not once :meth:`stop` has begun (it would outlive it: a table
        published, the swap hook called, in a worker closing)."""
        if self._stopping:
            return
        if self._expander is None or self._expander.done():
            self._expander = asyncio.get_running_loop().create_task(
                self._expand_dns(), name="l4proxy-rules-dns-expand"
            )

    async def _expand_dns(self) -> None:
        """Swap in the base re-expanded with the newest DNS answers, until
        the table live has them: one expansion at a time, in a thread.

        With thousands of ServiceEntries (up to MAX_ENDPOINTS entries) a
        re-expansion builds a whole new RouteTable: some 0.6 s of pure
        Python, which on the loop stopped every accept, the admin endpoint
        and /ready for as long, at each DNS change. In a thread the loop
        runs between its bytecodes, as during a reload's parse (see
        :meth:`reload`), and the table it makes goes live on the loop, in one
        assignment, as a reload's does.

        Ordering, by two counts kept on the loop: ``_answers``, bumped by
        each change of answers, and ``_live_answers``, the count the table
        live was expanded with. An expansion takes the base and a copy of
        the answers (:func:`answers_of`) at one count; when it ends it goes
        live only where the base is still the one it expanded (a reload
        that went live meanwhile made its own expansion, with answers as
        new as its swap: :meth:`_expanded`; this one, of the old base, is
        dropped), and answers that came meanwhile are expanded next, so the
        newest win and no older table follows a newer one. Answers coming
        faster than expansions are taken together, the newest each time.
        An expansion that fails is logged; the table live keeps serving,
        and the next change of answers tries again."""
        st = self.state
        while self._live_answers < self._answers:
            base, answers = self.base, self._answers
            states = answers_of(self.dns.names)
            self.expanding = True
            try:
                table = await in_a_daemon_thread(
                    functools.partial(_expand_without_gc, base, states), EXPAND_THREAD
                )
            except Exception:
                log.exception(
                    "unexpected error while expanding DNS answers into the rules; "
                    "the table live keeps serving"
                )
                return
            finally:
                self.expanding = False
            if base is not self.base:
                continue  # a reload went live meanwhile, expanded with its own answers
            self._publish(table)
            self._live_answers = answers
            st.dns_updates += 1
            if self.on_swap:
                try:
                    self.on_swap(st)
                except Exception:  # (a hook's bug: the table is live all the same)
                    log.exception("the rules' swap hook failed on a DNS update")

    async def _expanded(
        self,
        table: RouteTable,
        first: Mapping[str, tuple[Resolution | Exception, float]] | None,
    ) -> tuple[RouteTable, int] | None:
        """A reload's *table* with its DNS names replaced by their addresses
        (the answers known, and *first*: its new names' first lookups, as
        :meth:`_swap` records them), made in a thread, and the answers'
        generation (see :meth:`_expand_dns`). Made again where answers
        changed meanwhile (EXPAND_TRIES times at most), so that it goes live
        with answers as new as the table it replaces: where they still
        change, it goes live and :meth:`_swap` has the newest expanded into
        it. None where *table* has no DNS service (it is served as it is),
        or the thread failed (then _swap expands it on the loop)."""
        if not any(svc.resolution == "DNS" for svc in table.services()):
            return None
        outcome: tuple[RouteTable, int] | None = None
        for _ in range(EXPAND_TRIES):
            answers = self._answers
            states = answers_of(self.dns.names)
            for name, (result, _) in (first or {}).items():
                if isinstance(result, Resolution):  # (a failure leaves a new name a name)
                    states[name] = NameState(name, result.addresses, resolved=True)
            try:
                made = await in_a_daemon_thread(
                    functools.partial(_expand_without_gc, table, states), EXPAND_THREAD
                )
            except Exception:
                log.exception("unexpected error while expanding DNS answers into the rules")
                return None
            outcome = made, answers
            if self._answers == answers:
                break
        return outcome

    async def _run_dns(self) -> None:
        while True:
            due = self.dns.next_due()
            # Sleep until the next name is due, or until a reload adds names.
            # (time.monotonic, not loop.time: uvloop's clock is cached per tick.)
            wait = None if due is None else max(0.0, due - time.monotonic())
            if wait is None or wait > 0:
                await woken(self._dns_wake, wait)
            self._dns_wake.clear()
            try:
                await self.refresh_dns()
            except Exception:  # a resolver bug must not stop refreshes for good
                log.exception("unexpected error while refreshing DNS endpoints")
                await asyncio.sleep(self.dns.min_ttl)

    async def _run(self) -> None:
        while True:
            await woken(self._wake, self.interval)
            self._wake.clear()
            if self.last_good.due():
                await self._check_shared()
            fp = await self._stat()
            if fp is None or (fp == self._fingerprint and not self._retry_due()):
                continue
            await asyncio.sleep(self._still_for(fp))
            if await self._stat() != fp:
                continue  # still being written; look again next round
            self._retry_at = None  # (set again if this load cannot read them either)
            try:
                await self.reload(fp)
            except Exception:  # a loader bug must not stop reloads for good
                log.exception("unexpected error while loading rules")
                self._fingerprint = fp


def broken_files(error: ConfigError, read: RuleFiles) -> list[str]:
    """The files *error*'s errors are in, in load order, where each is in a
    file *read* holds; [] where one is not (of no file, of a directory).
    Those a sidecar holds back (``l4proxy create|replace|delete`` judge a
    change by the same rule)."""
    files = [path for path, _ in read.files]
    broken = {d.file for d in error.errors}
    if not broken or not broken <= set(files):
        return []
    return [path for path in files if path in broken]


def unresolved_of(notes: Sequence[Diagnostic]) -> frozenset[Unresolved]:
    """The warnings of reason UNRESOLVED of a load's *notes* (each a share of
    requests sent to a host no ServiceEntry describes), as two loads'
    are compared: by object and message, not by file and line."""
    return frozenset((d.kind, d.name, d.message) for d in notes if d.reason == UNRESOLVED)


def new_unresolved(notes: Sequence[Diagnostic], served: frozenset[Unresolved]) -> list[Diagnostic]:
    """The warnings of reason UNRESOLVED of *notes* that are not among
    *served* (another load's :func:`unresolved_of`)."""
    return [
        d for d in notes if d.reason == UNRESOLVED and (d.kind, d.name, d.message) not in served
    ]


def served_objects(documents: Sequence[ObjectSummary]) -> ServedObjects:
    """The objects of a table by their key (kind, namespace and name: what
    Istio keys an object by), each with the file it came from (files, for
    the rare key held twice: an Istio Gateway and a Gateway API one of one
    name). Kept for the table served, in place of its documents: a third
    of their memory (0.4 MB for 4,000 objects; the names are the table's)."""
    out: ServedObjects = {}
    for o in documents:
        key = (sys.intern(o.kind), sys.intern(o.namespace), o.name)
        had = out.get(key)
        out[key] = o.file if had is None else (*_files(had), o.file)
    return out


def _files(where: str | tuple[str, ...]) -> tuple[str, ...]:
    return (where,) if isinstance(where, str) else where


def _gone(served: ServedObjects, loaded: Sequence[ObjectSummary], files: set[str]) -> list[str]:
    """The objects of *served* that *loaded* has fewer of, each as the log
    says it: where it was served from, and whether that file is gone from
    *files* (the paths found now) or no longer holds it."""
    left = Counter((o.kind, o.namespace, o.name) for o in loaded)
    out: list[str] = []
    for (kind, namespace, name), where in served.items():
        for file in _files(where)[left[kind, namespace, name] :]:
            why = "which is gone" if file not in files else "which no longer holds it"
            out.append(f"{kind} {namespace}/{name} (served from {file}, {why})")
    return out


def _held_files(refused: ConfigError, broken: list[str], last: Texts) -> list[HeldFile]:
    """Each file of *broken* as held: its errors in *refused*, and the entry
    of its last good text in *last* (None: none, so left out)."""
    return [
        HeldFile(
            path,
            tuple(str(d) for d in refused.errors if d.file == path),
            last[path][0] if path in last else None,
        )
        for path in broken
    ]


def _texts_of(read: RuleFiles, entries: Mapping[str, FileEntry]) -> Texts:
    """The texts of *read* by path, each with the fingerprint entry it was
    read at (*entries*, by path as found; one not there, a file that came
    between the fingerprint and the read, as gone)."""
    return {
        path: (entries.get(path, (path, path, *_GONE)), text)
        for path, text in read.files
        if isinstance(text, str)
    }


def _version(entry: FileEntry) -> str:
    """A file's version as its fingerprint entry says it, for the log."""
    modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry[5] / 1e9))
    return f"{entry[4]} bytes, modified {modified}"


def _errors_of(error: ConfigError) -> str | None:
    """*error*'s errors, a line each, for the log of a refused load (None
    where it has none of its own: then its whole text)."""
    lines = [str(d) for d in error.errors]
    if lines and isinstance(error, StartRefused):
        lines.append(error.why)
    return "\n".join(lines) or None

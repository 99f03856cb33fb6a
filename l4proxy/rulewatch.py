"""Watch the rule path(s) and reload on change (poll) or on demand (SIGHUP).

Theory of operation
-------------------
Every ``interval`` seconds the watcher takes a *fingerprint* of the rule
paths: for a file its resolved path, inode, size and mtime; for a directory
the same for each visible ``*.yaml``/``*.yml``/``*.json`` entry, following
symlinks. A Kubernetes ConfigMap mount swaps the ``..data`` symlink
atomically, which changes the resolved paths and inodes, so a swap is seen
even when sizes and times repeat.

On a change the watcher waits ``settle`` seconds and fingerprints again; it
loads only when two fingerprints agree, so a file caught mid-write is read
once the writer is done. A load that fails keeps the last good table (Istio
#5204, istio/api #586: a half-applied or invalid config took hosts down) and
records the error for ``/config_dump`` and ``/stats``; the next change tries
again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from l4proxy.config import ConfigError, load_rules
from l4proxy.routing import RouteTable

log = logging.getLogger("l4proxy.rules")

RULE_SUFFIXES = (".yaml", ".yml", ".json")
Fingerprint = tuple[tuple[str, int, int, int], ...]


def fingerprint(paths: Sequence[str]) -> Fingerprint:
    items: list[tuple[str, int, int, int]] = []

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            items.append((path, -1, -1, -1))
            return
        items.append((os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns))

    for p in paths:
        if os.path.isdir(p):
            try:
                names = sorted(os.listdir(p))
            except OSError:
                items.append((p, -1, -1, -1))
                continue
            for name in names:
                if not name.startswith(".") and name.endswith(RULE_SUFFIXES):
                    add(os.path.join(p, name))
            add(p)
        else:
            add(p)
    return tuple(items)


@dataclass
class RuleState:
    """What the sidecar serves from, and how it got there."""

    table: RouteTable
    generation: int = 0
    loaded_at: float = field(default_factory=time.time)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    last_error: str | None = None
    last_error_at: float | None = None
    reloads: int = 0
    reload_failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "loaded_at": self.loaded_at,
            "sources": self.sources,
            "notes": self.notes,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "table": self.table.to_json(),
        }


class RuleWatcher:
    def __init__(
        self,
        paths: Sequence[str],
        namespace: str = "default",
        domain: str = "cluster.local",
        interval: float = 1.0,
        settle: float = 0.1,
        on_swap: Callable[[RuleState], None] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.namespace = namespace
        self.domain = domain
        self.interval = interval
        self.settle = settle
        self.on_swap = on_swap
        self.state = RuleState(table=RouteTable.empty())
        self._fingerprint: Fingerprint | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def load_now(self) -> bool:
        """Load synchronously; swap on success. Returns True if swapped."""
        self._fingerprint = fingerprint(self.paths)
        st = self.state
        try:
            result = load_rules(self.paths, namespace=self.namespace, domain=self.domain)
        except ConfigError as exc:
            st.reload_failures += 1
            st.last_error = str(exc)
            st.last_error_at = time.time()
            for line in str(exc).splitlines():
                log.error("rules rejected, keeping generation %d: %s", st.generation, line)
            return False
        st.table = result.table
        st.generation += 1
        st.reloads += 1
        st.loaded_at = time.time()
        st.sources = list(result.sources)
        st.notes = [str(n) for n in result.notes]
        st.last_error = None
        st.last_error_at = None
        for note in st.notes:
            log.info("rules: %s", note)
        log.info("rules generation %d loaded from %s", st.generation, ", ".join(st.sources) or "-")
        if self.on_swap:
            self.on_swap(st)
        return True

    def request_reload(self) -> None:
        """SIGHUP: reload at once, whether or not the files changed."""
        self._fingerprint = None
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            fp = fingerprint(self.paths)
            if fp == self._fingerprint:
                continue
            await asyncio.sleep(self.settle)
            if fingerprint(self.paths) != fp:
                continue  # still being written; look again next round
            try:
                self.load_now()
            except Exception:  # a loader bug must not stop reloads for good
                log.exception("unexpected error while loading rules")
                self._fingerprint = fp

"""The last good version of each rule file: what a load serves for a broken one.

Theory of operation
-------------------
A reload whose files do not load, with every error in some files, is tried
again with each of those files at the text it had in the rules served, or
left out where it had none (:mod:`~l4proxy.rules.watch`). This module keeps
those texts: after every swap, the text of each file served and the
fingerprint entry it was read at (what the table's digest is made of, so
that a held file counts as the version served, not as the file on disk).

Workers must hold the same file at the same version, or their digests (and
their routing) differ: a worker restarted while a file is broken has no
last good version of it of its own, and would serve without it beside
workers that hold it. So the supervisor creates one memory file (a memfd,
in :mod:`l4proxy.sidecar.supervisor`) that every worker it starts inherits
(``--rules-last-good-fd``): each worker writes what it serves there after
each swap, and a load that finds a file broken takes that file's last good
text from there. A worker writes in a thread of its own (the texts of a big
rule set take tens of milliseconds to encode: not on the event loop), the
whole at once, under a POSIX record lock (``lockf``: per process, where
flock's lock would be per open file description, which every worker
shares), at offset 0 (``pwrite``: the file offset is shared too). The
memory file holds what the latest writer served; a worker whose own latest
is not written yet, or that cannot read the file, uses its own. A
single-process sidecar (and a watcher in a test) keeps its own alone.

Nothing survives the supervisor: a sidecar started while a file is broken
has no last good text of any file, and its first load is refused (see
:class:`~l4proxy.rules.watch.StartRefused`) until the file is fixed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("l4proxy.rules")

# A rule file as the watcher's fingerprint sees it: (path as found, path as
# resolved, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, st_mode, st_uid)
FileEntry = tuple[str, str, int, int, int, int, int, int, int]
# Per path as found: the entry a file's text was read at, and that text
Texts = dict[str, tuple[FileEntry, str]]


class LastGood:
    """The text of each rule file served, for the next load that finds it
    broken. *fd*: the memory file shared with the other workers (None: this
    process's alone)."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd
        self._own: Texts = {}
        self._kept = 0  # keep() calls so far
        self._written = 0  # the last of them written to fd
        self._lock = threading.Lock()  # fd's readers and writers in this process

    def keep(self, texts: Mapping[str, tuple[FileEntry, str]]) -> None:
        """*texts* are served now (on the loop, at a swap): kept, and written
        to the shared memory file in a thread."""
        self._own = dict(texts)
        self._kept += 1
        if self.fd is not None:
            threading.Thread(
                target=self._write, name="l4proxy-rules-last-good", daemon=True
            ).start()

    def get(self) -> Texts:
        """The last good texts: the shared memory file's, unless this
        process's latest is not written there yet or it cannot be read."""
        with self._lock:
            own = self._own
            if self.fd is None or self._written != self._kept:
                return own
            try:
                data = self._read()
            except OSError as exc:
                log.warning(
                    "the rules' last good versions could not be read (%s); "
                    "this worker's own are used",
                    exc,
                )
                return own
        if not data:
            return own
        try:
            return _decode(data)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning(
                "the rules' last good versions could not be decoded (%s); "
                "this worker's own are used",
                exc,
            )
            return own

    def _write(self) -> None:
        """Write the latest kept texts (whichever keep() started this thread:
        a later one's may be written by an earlier thread, never the reverse)."""
        assert self.fd is not None
        with self._lock:
            kept, texts = self._kept, self._own
            if self._written == kept:
                return
            data = _encode(texts)
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
                try:
                    os.ftruncate(self.fd, 0)
                    done = 0
                    while done < len(data):
                        done += os.pwrite(self.fd, data[done:], done)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(self.fd, 0)  # rather none than a torn one
                    raise
                finally:
                    fcntl.lockf(self.fd, fcntl.LOCK_UN)
            except OSError as exc:  # (ENOMEM, ENOSPC: the others use their own)
                log.warning("the rules' last good versions could not be shared (%s)", exc)
                return
            self._written = kept

    def _read(self) -> bytes:
        assert self.fd is not None
        fcntl.lockf(self.fd, fcntl.LOCK_SH)
        try:
            size = os.fstat(self.fd).st_size
            parts: list[bytes] = []
            got = 0
            while got < size:
                part = os.pread(self.fd, size - got, got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            return b"".join(parts)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _encode(texts: Mapping[str, tuple[FileEntry, str]]) -> bytes:
    files = [[path, list(entry), text] for path, (entry, text) in texts.items()]
    return json.dumps({"files": files}).encode()


def _decode(data: bytes) -> Texts:
    doc: Any = json.loads(data)
    out: Texts = {}
    for path, entry, text in doc["files"]:
        if not (isinstance(path, str) and isinstance(text, str) and len(entry) == 9):
            raise ValueError(f"not a rule file's entry: {path!r}")
        found, resolved, dev, ino, size, mtime, ctime, mode, uid = entry
        if not (isinstance(found, str) and isinstance(resolved, str)):
            raise ValueError(f"not a rule file's entry: {path!r}")
        numbers = (int(dev), int(ino), int(size), int(mtime), int(ctime), int(mode), int(uid))
        out[path] = ((found, resolved, *numbers), text)
    return out

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
rule set take tens of milliseconds to encode: not on the event loop), under
a POSIX record lock (``lockf``: per process, where flock's lock would be
per open file description, which every worker shares), with ``pwrite`` at
offsets of its own (the file offset is shared too). The lock is asked for
without blocking, again and again for :data:`LOCK_WITHIN` seconds at most:
a worker stopped with it held (SIGSTOP, a debugger) kept the others'
writers and their next loads waiting for ever; past that a reader uses its
own texts, and a writer tries again at the next poll.

The file must survive a writer killed mid-write (the watchdog's SIGKILL, an
OOM kill) and a write that fails: torn or emptied, it gave a worker started
next no version of a broken file, and what that worker served and wrote
then misled the others. So it holds two *slots*: at its start two headers
(:data:`HEADER`: magic, sequence number, offset and length of a version,
and a BLAKE2b-256 of those and the version's bytes), past them the versions
they point to. A writer puts its version where it overlaps no byte of the
newest complete one, then writes the header of the other slot, with the
next sequence number; a reader takes the complete version (its digest
matches) of the highest number. Killed before its header is whole, a
writer leaves the newest version as it was; only what damages both slots
(the file truncated, garbage written over it) leaves none. What lies past
both versions is cut off after each write: the file holds three versions'
bytes at most (two, and the room a larger one skipped).

What a load gets (:meth:`LastGood.get`) is merged per path: the newer of
the file's newest version and the worker's own (its own while its latest
is not written yet, or where the file's is older than the one it wrote),
and either one where the other lacks the path. A worker that finds no
complete version where it has written one (damaged, or truncated to
nothing) uses its own and writes them again; every worker looks at the
file's size and headers at each poll of the rule files (:meth:`LastGood.due`,
on the loop: no lock, two system calls) and, where they are not as it last
saw them, checks the file in a thread (:meth:`LastGood.check`): so the file
is repaired within one poll by any worker that served, and a worker whose
first load found nothing loads again when the others' texts come. A
single-process sidecar (and a watcher in a test) keeps its own alone.

Nothing survives the supervisor: a sidecar started while a file is broken
has no last good text of any file, and its first load is refused (see
:class:`~l4proxy.rules.watch.StartRefused`) until the file is fixed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("l4proxy.rules")

# A rule file as the watcher's fingerprint sees it: (path as found, path as
# resolved, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, st_mode, st_uid)
FileEntry = tuple[str, str, int, int, int, int, int, int, int]
# Per path as found: the entry a file's text was read at, and that text
Texts = dict[str, tuple[FileEntry, str]]

MAGIC = b"l4pxlg\x00\x01"  # (the last byte: the layout's version)
# A slot's header: magic, sequence number, offset and length of its
# version, and a BLAKE2b-256 of all four and the version's bytes
HEADER = struct.Struct("<8sQQQ32s")
SLOTS = 2
DATA_AT = SLOTS * HEADER.size  # where the versions start
# Seconds a reader or writer waits for the record lock: a writer holds it
# for one write (milliseconds); past this the holder is stopped or stuck
LOCK_WITHIN = 1.0


class Damaged(Exception):
    """The memory file holds bytes but no complete version."""


@dataclass(frozen=True)
class Version:
    """A complete version found in the memory file: its slot and place."""

    seq: int
    slot: int
    offset: int
    length: int


class LastGood:
    """The text of each rule file served, for the next load that finds it
    broken. *fd*: the memory file shared with the other workers (None: this
    process's alone)."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd
        self._own: Texts = {}
        self._kept = 0  # keep() calls so far
        self._written = 0  # the last of them written to fd (-1: none, to write again)
        self._own_seq = 0  # the sequence number that write got
        self._seen = 0  # the highest sequence number found in fd or written there
        # the file's size and headers as last read or written here (changed():
        # another worker wrote, or something damaged it)
        self._shape: tuple[int, bytes] | None = None
        self._writing = False  # a writer thread is started and not done
        self._lock = threading.Lock()  # fd's readers and writers in this process
        self.lock_within = LOCK_WITHIN  # (see _locked)
        self._failing = False  # the last read or write of fd failed (see _failed)

    def keep(self, texts: Mapping[str, tuple[FileEntry, str]]) -> None:
        """*texts* are served now (on the loop, at a swap): kept, and written
        to the shared memory file in a thread."""
        self._own = dict(texts)
        self._kept += 1
        self._start_write()

    def get(self) -> Texts:
        """The last good texts: per path, the newer of the shared memory
        file's and this process's own (its own while its latest is not
        written there yet, or where the file's version is older than the
        one it wrote), and either where the other lacks the path. A file
        damaged or lost (no complete version where this process has written
        one) gives this process's own, and they are written again."""
        with self._lock:
            own = self._own
            if self.fd is None:
                return own
            try:
                with _locked(self.fd, fcntl.LOCK_SH, self.lock_within):
                    got = newest(self.fd)
                found, shared = (None, {}) if got is None else (got[0], _decode(got[1]))
            except (Damaged, ValueError, TypeError, KeyError) as exc:
                found, shared = None, {}
                log.warning(
                    "the rules' last good versions shared by the workers are damaged (%s); "
                    "this worker's own are used%s",
                    exc,
                    " and written there again" if own else "",
                )
            except OSError as exc:
                self._failed("could not be read (%s); this worker's own are used", exc)
                return own
            self._failing = False
            pending = self._written != self._kept
            if found is None and own and not pending:
                self._written = -1  # lost: write them again
                pending = True
            if found is not None:
                self._seen = max(self._seen, found.seq)
            own_newer = pending or found is None or found.seq < self._own_seq
        if pending:
            self._start_write()
        newer, older = (own, shared) if own_newer else (shared, own)
        merged = dict(newer)
        for path, kept in older.items():
            merged.setdefault(path, kept)
        return merged

    def due(self) -> bool:
        """Whether :meth:`check` has something to do (on the loop: a stat and
        one read of the headers, no lock): the file's size or headers are
        not as this process last read or wrote them, or its latest texts
        are to be written and no writer is at it."""
        if self.fd is None:
            return False
        if self._written != self._kept and not self._writing:
            return True
        try:
            return _shape(self.fd) != self._shape
        except OSError:
            return False

    def check(self) -> bool:
        """Look at the memory file (in a thread): where it holds no complete
        version and this process has texts written there, they are written
        again (a worker killed mid-write, the file truncated: the others,
        and a worker started next, must find them), as are its latest if
        their write is due. True where the file holds a version this process
        had not seen (a worker whose first load had none can load again)."""
        if self.fd is None:
            return False
        with self._lock:
            try:
                with _locked(self.fd, fcntl.LOCK_SH, self.lock_within):
                    shape = _shape(self.fd)
                    try:
                        got = newest(self.fd)
                    except Damaged:
                        got = None
                found = None if got is None else got[0]
            except OSError as exc:
                self._failed("could not be read (%s)", exc)
                return False
            self._failing = False
            self._shape = shape
            fresh = found is not None and found.seq > self._seen
            if found is not None:
                self._seen = max(self._seen, found.seq)
            elif self._kept and self._written == self._kept:
                log.warning(
                    "the rules' last good versions shared by the workers were lost "
                    "(%d bytes, no complete version); this worker's are written there again",
                    shape[0],
                )
                self._written = -1
            pending = self._written != self._kept
        if pending:
            self._start_write()
        return fresh

    def _failed(self, what: str, exc: OSError) -> None:
        """A read or write of the memory file failed: said at WARNING, once
        until one succeeds (a worker stopped with the lock held fails each
        poll), else at DEBUG."""
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "the rules' last good versions " + what, exc)
        self._failing = True

    def flush(self) -> None:
        """Write the latest kept texts now, in this thread (tests; a worker
        has them written by keep()'s thread)."""
        self._write()

    def _start_write(self) -> None:
        if self.fd is None:
            return
        self._writing = True
        threading.Thread(target=self._write, name="l4proxy-rules-last-good", daemon=True).start()

    def _write(self) -> None:
        """Write the latest kept texts (whichever keep() started this thread:
        a later one's may be written by an earlier thread, never the
        reverse) as a new version: into the slot that does not hold the
        newest complete one, its bytes where they overlap none of that
        one's, its header last. A writer killed at any point leaves that
        version whole, and a reader takes it."""
        assert self.fd is not None
        try:
            with self._lock:
                kept, texts = self._kept, self._own
                if self._written == kept:
                    return
                data = _encode(texts)
                try:
                    with _locked(self.fd, fcntl.LOCK_EX, self.lock_within):
                        seq = self._put(data)
                except OSError as exc:  # (ENOMEM, ENOSPC: the others use their own)
                    self._failed("could not be shared (%s); tried again at the next poll", exc)
                    return
                self._failing = False
                self._written, self._own_seq, self._seen = kept, seq, seq
        finally:
            self._writing = False

    def _put(self, data: bytes) -> int:
        """*data* written as the memory file's newest version (under the
        lock); its sequence number."""
        assert self.fd is not None
        try:
            got = newest(self.fd)
        except Damaged:
            got = None
        last = None if got is None else got[0]
        seq = max(self._seen, last.seq if last else 0) + 1
        if last is None:
            slot, offset = 0, DATA_AT
        else:
            slot = (last.slot + 1) % SLOTS
            offset = (
                DATA_AT
                if DATA_AT + len(data) <= last.offset
                else -(-(last.offset + last.length) // 8) * 8
            )
        _pwrite(self.fd, data, offset)
        _pwrite(self.fd, _header(seq, offset, data), slot * HEADER.size)
        end = max(offset + len(data), last.offset + last.length if last else 0)
        if os.fstat(self.fd).st_size > end:
            os.ftruncate(self.fd, end)  # (what is past both versions)
        self._shape = _shape(self.fd)
        return seq


def newest(fd: int) -> tuple[Version, bytes] | None:
    """The newest complete version in memory file *fd* (its header's digest
    matches its bytes), and its bytes; None where the file is empty. Raises
    Damaged where it holds bytes and no complete version."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    heads = _pread(fd, DATA_AT, 0)
    candidates = []
    for slot in range(SLOTS):
        raw = heads[slot * HEADER.size : (slot + 1) * HEADER.size]
        if len(raw) < HEADER.size:
            continue
        magic, seq, offset, length, digest = HEADER.unpack(raw)
        if magic == MAGIC and offset >= DATA_AT and offset + length <= size:
            candidates.append((seq, slot, offset, length, digest))
    for seq, slot, offset, length, digest in sorted(candidates, reverse=True):
        data = _pread(fd, length, offset)
        if _digest(seq, offset, data) == digest:
            return Version(seq, slot, offset, length), data
    raise Damaged(f"{size} bytes, no complete version")


def _digest(seq: int, offset: int, data: bytes) -> bytes:
    h = hashlib.blake2b(MAGIC, digest_size=32)
    h.update(struct.pack("<QQQ", seq, offset, len(data)))
    h.update(data)
    return h.digest()


def _header(seq: int, offset: int, data: bytes) -> bytes:
    return HEADER.pack(MAGIC, seq, offset, len(data), _digest(seq, offset, data))


def _shape(fd: int) -> tuple[int, bytes]:
    return os.fstat(fd).st_size, os.pread(fd, DATA_AT, 0)


@contextlib.contextmanager
def _locked(fd: int, how: int, within: float) -> Iterator[None]:
    """*fd*'s record lock, *how* (LOCK_SH, LOCK_EX), asked for without
    blocking until it is had, for *within* seconds at most: else
    TimeoutError (an OSError: the caller uses its own texts, or writes
    later). A blocking lockf waited for ever on a worker stopped (SIGSTOP,
    a debugger) with the lock held, and the waiter held this process's
    lock meanwhile: its next load waited too."""
    deadline = time.monotonic() + within
    pause = 0.001
    while True:
        try:
            fcntl.lockf(fd, how | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"its lock not had within {within:g} s (a worker stopped with it held?)"
            )
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)


def _pread(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < length:
        part = os.pread(fd, length - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


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

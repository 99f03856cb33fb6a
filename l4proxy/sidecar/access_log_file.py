"""--access-log's file: opened once before privileges drop, reopened on SIGUSR1.

Theory of operation
-------------------
The supervisor opens ``--access-log PATH`` (for appending, before it drops
privileges: a root-owned log directory) and every worker inherits that fd;
each relay's writer thread writes whole lines to a duplicate of its own
(:class:`l4proxy.dataplane.accesslog.LineWriter`, the compiled relay's
``l4_alog``).

A log rotated by renaming (logrotate without ``copytruncate``) leaves those
fds on the renamed file. SIGUSR1 says "reopen": as Envoy (its access logs)
and nginx do, the supervisor opens PATH anew, duplicates that onto the fd
the next workers inherit, and forwards SIGUSR1 to the workers, which each
open PATH and duplicate it onto their writers' fds (``dup2``: a write under
way ends in the file it began in, the next goes to the new one; no line is
lost or split) and onto the fd they inherited (or a lone process opened):
no process keeps the renamed file open, whose space logrotate's deletion
of it would otherwise never give back (a full disk stayed full). Before
this, SIGUSR1's default action killed the sidecar.

The reopen runs as the sidecar's user (1337 once privileges dropped): a
PATH it cannot create or open is reported, and the lines go on to the file
open before. Standard output (``-``, /dev/stdout) has nothing to reopen.

A reopen that fails is said once per process (the supervisor; a worker
whose own reopen fails: no fd to spare), and again only when its reason
changes, until one succeeds, which is said with how many failed
(:func:`reopen_access_log`): a SIGUSR1 storm (logrotate's ``postrotate``
for many logs, a script in a loop) into a directory the sidecar cannot
write said one error line per signal, where the log's reader wants one.
``l4proxy_access_log_reopen_failures_total`` counts each
(:func:`reopen_failures`: the supervisor's and its workers', summed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger("l4proxy.accesslog")

STDOUT = ("-", "/dev/stdout")

REOPEN_FAILURES = "l4proxy_access_log_reopen_failures_total"

# This process's reopens that failed: in all, and by path since the last
# that did not (how many, the last reason said): said once (_cannot)
_failures_total = 0
_failing: dict[str, tuple[int, str]] = {}


def reopen_failures() -> int:
    """Reopens that failed in this process since its start."""
    return _failures_total


def open_access_log(path: str) -> int:
    """--access-log's fd: standard output's (a duplicate) for ``-`` and
    /dev/stdout, else *path* opened for appending (created 0644): each
    worker's lines are whole write()s of whole lines (O_APPEND: never over
    each other's). A named pipe is opened without waiting for its reader:
    none is an error (ENXIO), not a start that never ends. Raises OSError."""
    if path in STDOUT:
        return os.dup(1)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, 0o644)
    os.set_blocking(fd, True)  # (the writers wait on it in threads of their own)
    return fd


def reopen_access_log(path: str | None, point: Callable[[int], object], own_fd: int = -1) -> bool:
    """SIGUSR1: open *path* anew, duplicate it onto *own_fd* (this
    process's copy of --access-log's fd, the one it opened or inherited:
    left on the renamed file, it would hold that file, and its space once
    deleted, for good) and hand it to *point*, which duplicates it onto the
    fds that write the log (the fd stays ours and is closed here). Whether
    it was reopened: no --access-log, standard output, or a path that
    cannot be opened (said at error, once until a reopen of it succeeds
    or its reason changes; counted: :func:`reopen_failures`) is not."""
    if path is None:
        log.info("SIGUSR1: no --access-log to reopen")
        return False
    if path in STDOUT:
        log.info("SIGUSR1: --access-log %s is standard output: nothing to reopen", path)
        return False
    try:
        fd = open_access_log(path)
    except OSError as exc:
        _cannot(path, exc)
        return False
    try:
        if own_fd >= 0:
            os.dup2(fd, own_fd, inheritable=False)
        point(fd)
    except OSError as exc:  # (no fd to spare for the writer's copy)
        _cannot(path, exc)
        return False
    finally:
        os.close(fd)
    failed, _ = _failing.pop(path, (0, ""))
    if failed:
        log.info(
            "SIGUSR1: --access-log %s: reopened again, after %d reopen(s) that failed",
            path,
            failed,
        )
    return True


def _cannot(path: str, exc: OSError) -> None:
    global _failures_total
    _failures_total += 1
    reason = exc.strerror or str(exc)
    failed, said = _failing.get(path, (0, ""))
    _failing[path] = (failed + 1, reason)
    (log.debug if failed and reason == said else log.error)(
        "SIGUSR1: --access-log %s: cannot reopen it: %s (as uid %d); its lines go on to "
        "the file open before (said once until a reopen succeeds; %s counts them)",
        path,
        reason,
        os.getuid(),
        REOPEN_FAILURES,
    )

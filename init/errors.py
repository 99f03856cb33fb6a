"""What can go wrong, as exit codes a Kubernetes operator can act on.

Every failure l4proxy-init reports is an :class:`InitError`: one line of text
that says what happened and what to do, and an :class:`ExitCode`. The codes
are part of the interface (docs/init.md lists them); do not renumber them.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    #: A bug: an exception we did not expect (the traceback goes to stderr).
    INTERNAL = 1
    #: A flag or value is wrong (argparse also uses 2). Nothing was touched.
    USAGE = 2
    #: Missing CAP_NET_ADMIN / CAP_NET_RAW (or CAP_SYS_ADMIN for --netns).
    PRIVILEGE = 3
    #: The environment lacks something: the namespace, libxtables, the
    #: iptables binaries, or kernel support for the requested backend.
    ENVIRONMENT = 4
    #: A chain with one of our names exists and holds rules we did not write.
    CONFLICT = 5
    #: The kernel refused the change (atomic per table and family: a family
    #: refused was left as it was), or what it holds after the commit is not
    #: the plan (then the commit happened: the message says what differs).
    APPLY = 6


class InitError(Exception):
    """A failure the user can fix; ``str()`` is the one line we print."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[InitError], tuple[ExitCode, str]]:
        # Crosses the per-family process boundary through a pickle.
        return (type(self), (self.code, self.message))


class UsageError(InitError):
    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.USAGE, message)

    def __reduce__(self) -> tuple[type[InitError], tuple[ExitCode, str]]:
        return (InitError, (self.code, self.message))

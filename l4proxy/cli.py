"""``l4proxy`` command line: one subcommand per module.

Exit codes (all subcommands): 0 success, 1 the input was understood but is
invalid or the operation failed, 2 usage error or unreadable input.
"""

from __future__ import annotations

import os
import sys

# ``l4proxy run``'s signals, blocked before this module imports anything
# (see _hold_at_first_step): its names, as l4proxy.sidecar.signals' HELD and
# IGNORED (a test checks that they agree).
START_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP", "SIGUSR2")
_mask_before: set[int] | None = None  # (blocked by _hold_at_first_step: the mask before)


def _starts_run(argv: Sequence[str]) -> bool:
    """Whether *argv* (sys.argv) is ``l4proxy run`` through its entry points:
    the console script (``l4proxy``) or ``python -m l4proxy`` (a worker)."""
    entry = argv[0] if argv else ""
    ours = os.path.basename(entry) == "l4proxy" or entry.endswith(
        os.path.join("l4proxy", "__main__.py")
    )
    return ours and next((a for a in argv[1:] if not a.startswith("-")), None) == "run"


def _hold_at_first_step() -> None:
    """The sidecar's processes block the signals they handle at their entry
    point's first step, the import of this module, before anything it
    imports (the imports up to their handlers, :func:`main`'s
    ``hold_signals``, took 12 to 40 ms on a busy two-core machine): a
    SIGHUP or SIGUSR1 meanwhile (a
    kubelet's reload script, logrotate) took its default action and killed
    the sidecar, a SIGTERM killed it undrained (or, to PID 1, was lost). A
    signal blocked stays pending, and reaches the handlers that
    ``hold_signals`` installs before it unblocks them (signals). Only the
    builtin ``_signal``, which the interpreter's start loaded: nothing is
    imported before the block. The interpreter's own start-up, before any
    of this runs, is no code's of ours (signals)."""
    global _mask_before
    if _mask_before is not None or not _starts_run(sys.argv):
        return
    sig = sys.modules.get("_signal")
    if sig is None:  # (an interpreter that installs no signal handlers)
        return
    wanted = {getattr(sig, name) for name in START_SIGNALS}
    _mask_before = set(sig.pthread_sigmask(sig.SIG_BLOCK, wanted))


_hold_at_first_step()

import argparse  # noqa: E402  (after the block: see _hold_at_first_step)
import importlib  # noqa: E402
import math  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import NoReturn  # noqa: E402

from l4proxy import __version__  # noqa: E402

# -- argument types shared by the subcommands (argparse: a bad value exits 2,
# one line naming the flag) -------------------------------------------------------


def number(value: str, what: str = "seconds") -> float:
    """A finite number: nan passed every range check (nan < 0 is false), and inf
    meant never."""
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of {what}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number of {what}")
    return v


def positive_seconds(value: str) -> float:
    v = number(value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must be more than 0 seconds")
    return v


def seconds_or_zero(value: str) -> float:
    v = number(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must not be negative")
    return v


def count(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must not be negative")
    return v


# subcommand -> module providing ``add_parser(subparsers)``; imported lazily so
# that ``l4proxy validate`` does not pay for uvloop or pyroute2.
SUBCOMMANDS: dict[str, str] = {
    "validate": "l4proxy.rules.validate",
    "run": "l4proxy.sidecar.run",
    "demo": "l4proxy.demo.tutorial",
    "inject": "l4proxy.inject",
    "create": "l4proxy.rules.apply",
    "replace": "l4proxy.rules.apply",
    "delete": "l4proxy.rules.apply",
    "canary": "l4proxy.canary.command",  # issue 13
}

DESCRIPTION = """\
l4proxy: Istio-style traffic shifting for a pod, without Istio.

  l4proxy validate RULES...      check rule files the way the sidecar would
  l4proxy run --rules PATH       run the sidecar (after l4proxy-init captured traffic)
  l4proxy demo                   the request-routing tutorial in network namespaces
  l4proxy inject -f IN.yaml      add the init container and sidecar to Kubernetes manifests
  l4proxy create|replace|delete -f FILE --rules DIR
                                 istioctl's verbs: validate, then change the watched directory
  l4proxy canary SERVICE --stable V1 --canary V2 --rules PATH --metrics HOST:PORT
                                 progressive delivery with automatic rollback

Run 'l4proxy COMMAND --help' for each command's options.
"""


class _Parser(argparse.ArgumentParser):
    """A usage error in one line: the flag, what is wrong with it, where the
    help is (argparse writes the whole usage first: twenty lines for run,
    above the one that matters). Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # The innermost parser names itself first (a subcommand's parser
        # returns before its parent's): its help is the one to point at.
        ns, extras = super().parse_known_args(args, namespace)
        if not hasattr(ns, "_parser"):
            ns._parser = self
        return ns, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's, but an argument no parser took is reported by the
        subcommand it followed (`l4proxy canary x --bogus` points at
        `l4proxy canary --help`, where argparse named `l4proxy --help`)."""
        ns, extras = self.parse_known_args(args, namespace)
        owner: _Parser = ns.__dict__.pop("_parser", self)
        if extras:
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="l4proxy",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"l4proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue  # not built yet in this tree
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the subcommand asked for (fast startup).
    first = next((a for a in args_list if not a.startswith("-")), None)
    if first == "run":  # supervisor and workers: see l4proxy.sidecar.lean
        from l4proxy.sidecar.lean import keep_out
        from l4proxy.sidecar.signals import hold_signals

        hold_signals()  # first (signals): a SIGTERM to a starting PID 1 was lost
        keep_out()
    elif _mask_before is not None:  # (held for a run that is not one: as they were)
        import signal

        signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(args_list)
    args.raw_argv = args_list  # the supervisor restarts workers with the same arguments
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result

"""The one module that touches the kernel: namespaces, nat tables, backends.

Theory of operation
-------------------
:func:`run` handles the address families one after the other, each in a
process of its own (:func:`_in_own_process`). Two kernel facts force that:

* python-iptables loads the xtables extensions of one family per process:
  after IPv4's REDIRECT is loaded, IPv6's cannot be ("can't find target
  REDIRECT"), and the reverse.
* ``setns`` moves the calling thread, but a python-iptables ``Table`` made
  before it keeps a handle on the old namespace's table. A fresh process that
  enters the namespace *before* importing iptc cannot get this wrong, and the
  caller's process (a test, or a shell) stays where it was.

Inside the family process (:func:`run_family`): enter the namespace, pick the
backend, read the nat table with ``*-save``, plan with :mod:`.plan`, apply the
changes as one commit (python-iptables ``commit()`` for legacy, one
``*-nft-restore --noflush`` transaction for nft), then read the table again
and check that our part of it is exactly the plan. The parent never imports
iptc. Every family goes through that twice: first a pass that stops after
planning (``FamilyJob.check_only``) for all families, so that a conflict or
a missing backend anywhere refuses before anything is changed; then the
pass that applies, IPv4 before IPv6, each family reported as it is done.
A family that is not captured (IPv6 with --no-ipv6, or no global IPv6
address) has our rules of an earlier run removed (:func:`_drop_stale`), or
left with a warning: it never refuses the run.

The legacy commit replaces the whole table and fails with EAGAIN when
someone changed it since our snapshot (python-iptables takes no xtables
lock): we take ``/run/xtables.lock`` like iptables-legacy does, and
re-read, re-plan and retry on EAGAIN.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal, Protocol

from .errors import ExitCode, InitError
from .options import CaptureOptions, Family, parse_netns
from .plan import (
    AppendRule,
    Change,
    CreateChain,
    DeleteChain,
    DeleteRule,
    FlushChain,
    Rule,
    RuleSet,
    describe,
    desired_ruleset,
    parse_save,
    plan_changes,
    restore_text,
)

Mode = Literal["apply", "cleanup", "dry-run"]
BackendChoice = Literal["legacy", "nft", "auto"]
IPv6Choice = Literal["on", "off", "auto"]

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CLONE_NEWNET = 0x40000000
NETNS_DIRS = ("/run/netns", "/var/run/netns")
XTABLES_LOCK = "/run/xtables.lock"
COMMIT_ATTEMPTS = 5


@dataclass(frozen=True)
class FamilyJob:
    """Everything a family process needs; crosses the process boundary."""

    family: Family
    mode: Mode
    options: CaptureOptions
    netns: str | None
    ipv6: IPv6Choice
    backend: BackendChoice
    #: Read and plan only, change nothing: the first pass, over every family
    #: (and every backend --cleanup visits), so that whatever refuses (a
    #: conflict, a missing backend) refuses before anything is changed.
    check_only: bool = False


@dataclass(frozen=True)
class FamilyReport:
    """What happened to one family's nat table, for the log and stdout."""

    family: Family
    status: Literal["installed", "unchanged", "removed", "skipped", "planned"]
    backend: str
    summary: str
    ruleset: str
    warning: str = ""


# -- checks done before anything is touched ----------------------------------


def resolve_netns(name: str) -> str:
    """``NAME`` (as ``ip netns`` names them) or a path such as /proc/PID/ns/net."""
    parse_netns(name)  # "" is no namespace, not the current one
    candidates = [name] if "/" in name else [os.path.join(d, name) for d in NETNS_DIRS]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise InitError(
        ExitCode.ENVIRONMENT,
        f"network namespace {name!r} not found ({' or '.join(candidates)} does not exist); "
        f"list them with: ip netns list, or pass a path like /proc/PID/ns/net",
    )


def check_privileges() -> None:
    """Fail early and clearly instead of "can't initialize iptables table 'nat'"."""
    caps = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    missing = [
        name
        for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_NET_RAW, "CAP_NET_RAW"))
        if not caps & (1 << bit)
    ]
    if missing:
        raise InitError(
            ExitCode.PRIVILEGE,
            f"missing {' and '.join(missing)}: run the init container with NET_ADMIN and "
            f"NET_RAW (securityContext.capabilities.add: [NET_ADMIN, NET_RAW]), or as root",
        )


# -- namespace and addresses --------------------------------------------------


def enter_netns(path: str) -> None:
    """Move this process into the network namespace at *path* (no way back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InitError(
            ExitCode.ENVIRONMENT, f"cannot open network namespace {path}: {exc}"
        ) from None
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            if err == errno.EPERM:
                raise InitError(
                    ExitCode.PRIVILEGE,
                    f"entering network namespace {path} needs CAP_SYS_ADMIN: run as root, "
                    f"or run l4proxy-init inside the pod (without --netns)",
                )
            raise InitError(
                ExitCode.ENVIRONMENT,
                f"{path} is not a network namespace ({os.strerror(err)})",
            )
    finally:
        os.close(fd)


def has_global_ipv6() -> bool:
    """Does the current namespace have an IPv6 address of global scope?"""
    from pyroute2 import IPRoute  # netlink socket opened in the current namespace

    with IPRoute() as ipr:
        # RT_SCOPE_UNIVERSE is 0; ::1 is host scope, fe80:: is link scope.
        return any(msg.get("scope") == 0 for msg in ipr.get_addr(family=socket.AF_INET6))


# -- backends -----------------------------------------------------------------


class Backend(Protocol):
    name: str
    save: str  # the command that shows its nat table

    def read(self) -> str: ...

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...

    def apply(self, changes: Sequence[Change]) -> None: ...


class RetryCommit(Exception):
    """The table changed under us between snapshot and commit."""


def _run_tool(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise InitError(
            ExitCode.ENVIRONMENT,
            f"{argv[0]} not found: install the iptables package in the init image",
        )
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)


def _tool_failure(tool: str, result: subprocess.CompletedProcess[str], what: str) -> InitError:
    detail = (
        " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
    )
    if "Permission denied" in detail or "Operation not permitted" in detail:
        return InitError(
            ExitCode.PRIVILEGE,
            f"{tool}: {detail}; run the init container with NET_ADMIN and NET_RAW",
        )
    return InitError(
        ExitCode.APPLY if what == "apply" else ExitCode.ENVIRONMENT, f"{tool}: {detail}"
    )


def failed_line(message: str, restore_input: str) -> str:
    """*message* with the restore input's line it names ("line 2 failed"):
    the input is ours, built in memory, and the user never sees it."""
    m = re.search(r"\bline (\d+) failed", message)
    lines = restore_input.splitlines()
    if m is None or not 1 <= int(m.group(1)) <= len(lines):
        return message
    return f"{message} (line {m.group(1)} of the restore input: {lines[int(m.group(1)) - 1]})"


class NftBackend:
    """iptables-nft: the nat table lives in nf_tables as ``table ip[6] nat``."""

    def __init__(self, family: Family) -> None:
        prefix = "iptables" if family == 4 else "ip6tables"
        self.name = f"{prefix}-nft"
        self.save = f"{prefix}-nft-save"
        self.restore = f"{prefix}-nft-restore"

    @staticmethod
    def available(family: Family) -> bool:
        prefix = "iptables" if family == 4 else "ip6tables"
        return all(shutil.which(f"{prefix}-nft-{t}") for t in ("save", "restore"))

    def read(self) -> str:
        result = _run_tool([self.save, "-t", "nat"])
        if result.returncode != 0:
            raise _tool_failure(self.save, result, "read")
        return result.stdout

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        yield  # nf_tables transactions are atomic on their own

    def apply(self, changes: Sequence[Change]) -> None:
        # One restore input is one nf_tables transaction: all or nothing.
        text = restore_text(changes)
        result = _run_tool([self.restore, "--noflush"], stdin=text)
        if result.returncode != 0:
            exc = _tool_failure(self.restore, result, "apply")
            raise InitError(exc.code, failed_line(exc.message, text))


def _library_dirs_for_iptc() -> None:
    """Tell python-iptables where its libraries are, when we know, so that
    its import does not look for them with subprocesses.

    Left to itself, ``import iptc`` runs ``ldconfig -N -v`` (to find the
    xtables extensions' directory) and, for its own ``libxtwrapper`` (beside
    the package, under a name ``ctypes.util.find_library`` never finds),
    ``ldconfig -p`` and ``gcc``/``ld`` probes name after name: 20 processes
    and ~0.1 s, in each family process, twice. A directory the user set
    (``XTABLES_LIBDIR``, ``IPTABLES_LIBDIR``) is kept; a guess that is not
    there is not set, and iptc searches as before."""
    import importlib.util
    import sysconfig

    if "XTABLES_LIBDIR" not in os.environ:
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        for base in (f"/usr/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/lib"):
            if os.path.isdir(os.path.join(base, "xtables")):
                os.environ["XTABLES_LIBDIR"] = os.path.join(base, "xtables")
                break
    if "IPTABLES_LIBDIR" not in os.environ:
        spec = importlib.util.find_spec("iptc")
        if spec is not None and spec.submodule_search_locations:
            where = os.path.dirname(next(iter(spec.submodule_search_locations)))
            suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
            if os.path.exists(os.path.join(where, f"libxtwrapper{suffix}")):
                os.environ["IPTABLES_LIBDIR"] = where


def load_iptc() -> Any:
    """python-iptables, or the error that says its libraries are missing.
    Loading it opens no table."""
    try:
        _library_dirs_for_iptc()
        import iptc
    except Exception as exc:  # any failure here means "no libxtables"
        raise InitError(
            ExitCode.ENVIRONMENT,
            f"python-iptables cannot load libxtables/libiptc ({type(exc).__name__}: {exc}); "
            f"install the iptables package (libxtables12, libip4tc2, libip6tc2) in the "
            f"init image, or use --backend nft",
        ) from None
    return iptc


class LegacyBackend:
    """iptables-legacy (x_tables) through python-iptables."""

    def __init__(self, family: Family) -> None:
        prefix = "iptables" if family == 4 else "ip6tables"
        self.family = family
        self.name = f"{prefix}-legacy"
        self.save = f"{prefix}-legacy-save"
        iptc = load_iptc()
        self.iptc: Any = iptc
        table_type = iptc.Table if family == 4 else iptc.Table6
        try:
            self.table: Any = table_type(table_type.NAT, autocommit=False)
            # Table objects are cached per process: refresh() takes a new
            # snapshot, in the namespace this process is in now.
            self.table.refresh()
        except iptc.IPTCError as exc:
            text = str(exc)
            if "Permission denied" in text or "Operation not permitted" in text:
                raise InitError(
                    ExitCode.PRIVILEGE,
                    f"cannot open the legacy IPv{family} nat table ({text}): run the init "
                    f"container with NET_ADMIN and NET_RAW",
                ) from None
            raise InitError(
                ExitCode.ENVIRONMENT,
                f"the kernel has no legacy IPv{family} nat table ({text}); "
                f"use --backend nft (or --backend auto)",
            ) from None

    def read(self) -> str:
        result = _run_tool([self.save, "-t", "nat"])
        if result.returncode != 0:
            raise _tool_failure(self.save, result, "read")
        return result.stdout

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with _xtables_lock():
            self.table.refresh()  # the snapshot our commit is checked against
            yield

    def apply(self, changes: Sequence[Change]) -> None:
        iptc = self.iptc
        table = self.table
        try:
            for change in changes:
                if isinstance(change, CreateChain):
                    table.create_chain(change.chain)
                elif isinstance(change, FlushChain):
                    iptc.Chain(table, change.chain).flush()
                elif isinstance(change, DeleteRule):
                    chain = iptc.Chain(table, change.chain)
                    chain.delete_rule(self._find(chain, change.comment))
                elif isinstance(change, AppendRule):
                    iptc.Chain(table, change.rule.chain).append_rule(self._build(change.rule))
                elif isinstance(change, DeleteChain):
                    table.delete_chain(change.chain)
            table.commit()
        except (iptc.IPTCError, iptc.xtables.XTablesError) as exc:
            text = str(exc)
            table.refresh()  # drop what was staged
            if "temporarily unavailable" in text:
                raise RetryCommit(text) from None
            raise InitError(
                ExitCode.APPLY,
                f"the kernel refused the IPv{self.family} nat rules ({text}); nothing was changed",
            ) from None

    def _find(self, chain: Any, comment: str) -> Any:
        for rule in chain.rules:
            if any(m.name == "comment" and m.comment == comment for m in rule.matches):
                return rule
        raise RetryCommit(f"rule {comment} vanished from {chain.name}")

    def _build(self, spec: Rule) -> Any:
        # Same option order as Rule.save_line(): iptables-save prints matches
        # in the order they were added, and plan and kernel are compared as text.
        rule = self.iptc.Rule() if self.family == 4 else self.iptc.Rule6()
        if spec.destination:
            rule.dst = spec.destination
        if spec.out_interface:
            rule.out_interface = spec.out_interface
        if spec.tcp or spec.dport is not None:
            rule.protocol = "tcp"
        if spec.dport is not None:
            rule.create_match("tcp").dport = str(spec.dport)
        if spec.uid_owner is not None:
            rule.create_match("owner").uid_owner = str(spec.uid_owner)
        if spec.gid_owner is not None:
            rule.create_match("owner").gid_owner = str(spec.gid_owner)
        rule.create_match("comment").comment = spec.comment
        target = rule.create_target(spec.jump)
        if spec.to_port is not None:
            target.to_ports = str(spec.to_port)
        return rule


@contextlib.contextmanager
def _xtables_lock(timeout: float = 10.0) -> Iterator[None]:
    """The lock iptables-legacy takes, so that we never race a concurrent iptables."""
    try:
        fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        yield  # read-only /run: the EAGAIN retry still protects the commit
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InitError(
                        ExitCode.APPLY,
                        f"{XTABLES_LOCK} is held by another process for {timeout:.0f}s; "
                        f"is an iptables command hanging?",
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def legacy_nat_exists(family: Family) -> bool | None:
    """Whether the current namespace has a legacy (x_tables) nat table, from
    /proc/net/ip_tables_names (ip6_tables_names); ``None``: cannot tell.

    Opening the table, even ``iptables-legacy-save -t nat`` reading it,
    creates it: an empty legacy table that makes the image's iptables-save
    (iptables-nft) warn "iptables-legacy tables present" for the pod's
    life. A table that does not exist holds nothing of ours, so it is
    never opened just to look.
    """
    names = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
    try:
        with open(names) as f:
            return "nat" in f.read().split()
    except FileNotFoundError:
        # x_tables for this family is not loaded at all: no legacy table (if
        # this /proc is one: without /proc/net we know nothing)
        return False if os.path.isdir("/proc/net") else None
    except OSError:
        return None


class NoLegacyTable:
    """A legacy nat table that does not exist: read as empty, never created."""

    def __init__(self, family: Family) -> None:
        self.name = f"{'iptables' if family == 4 else 'ip6tables'}-legacy"
        self.save = f"{self.name}-save"

    def read(self) -> str:
        return ""

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        yield

    def apply(self, changes: Sequence[Change]) -> None:
        raise AssertionError(f"changes planned for a {self.name} table that does not exist")


def choose_backends(
    family: Family, choice: BackendChoice, mode: Mode, check_only: bool = False
) -> list[Backend]:
    """The backend(s) to use in the current namespace.

    ``auto`` uses nft where our rules already are there (the node switched, or
    a previous run chose nft), or where the namespace's nat rules are (nft
    has some, legacy none), otherwise legacy when the kernel still has it
    (python-iptables writes there), otherwise nft; nft binaries without
    nf_tables in the kernel count as no nft. ``--cleanup`` with ``auto``
    visits both, so that nothing of ours is left in either. A legacy table
    that does not exist yet is not opened unless legacy is where the rules
    go (see :func:`legacy_nat_exists`), and then only by the pass that
    applies: with *check_only* (the first pass, which may yet refuse) it is
    read as empty.
    """
    if choice == "legacy":
        return [LegacyBackend(family)]
    if choice == "nft":
        return [NftBackend(family)]
    nft_ok = NftBackend.available(family)
    no_legacy_table = legacy_nat_exists(family) is False
    legacy: Backend | None = None
    legacy_error: InitError | None = None

    def open_legacy() -> Backend | None:
        nonlocal legacy_error
        try:
            if check_only and no_legacy_table:
                load_iptc()  # without libxtables, legacy is out here as in the apply pass
                return NoLegacyTable(family)
            return LegacyBackend(family)
        except InitError as exc:
            if exc.code != ExitCode.ENVIRONMENT:
                raise
            legacy_error = exc
            return None

    if not no_legacy_table:
        legacy = open_legacy()
    if mode == "cleanup":
        backends: list[Backend] = [NoLegacyTable(family)] if no_legacy_table else []
        if legacy is not None:
            backends.append(legacy)
        if nft_ok:
            backends.append(NftBackend(family))
        if backends:
            return backends
    else:
        nft: str | None = None
        nft_error: InitError | None = None
        if nft_ok:
            try:
                nft = NftBackend(family).read()
            except InitError as exc:  # the binaries are there, nf_tables is not
                if exc.code != ExitCode.ENVIRONMENT:
                    raise
                nft_error = exc
        if nft is not None and (
            parse_save(nft).our_lines()
            # The pod's namespace already has nat rules in nft (a CNI, the
            # runtime) and none in legacy: ours go beside them, where
            # iptables-save shows them and no hook order decides between
            # two tables (kube-proxy's iptables-wrapper decides so too).
            or (_has_rules(nft) and (legacy is None or not _has_rules(legacy.read())))
        ):
            return [NftBackend(family)]
        if legacy is None and no_legacy_table:
            # legacy it is: only now is its table created (by the apply pass)
            legacy = open_legacy()
        if legacy is not None:
            return [legacy]
        if nft is not None:
            return [NftBackend(family)]
        if nft_error is not None:
            raise nft_error
    raise InitError(
        ExitCode.ENVIRONMENT,
        f"no iptables backend works for IPv{family}: legacy: "
        f"{legacy_error.message if legacy_error else '?'}; nft: {NftBackend(family).restore} "
        f"not found (install the iptables package)",
    )


def _has_rules(save_text: str) -> bool:
    """Whether an iptables-save dump of the nat table holds any rule.

    Rules written with ``nft`` itself in base chains iptables-nft does not
    know show only as a comment, "# Table `nat' contains incompatible
    base-chains, use 'nft' tool to list them." (1.8.9; older: "# Table
    `nat' is incompatible, use 'nft' tool."): that table has rules too.
    """
    return any(
        line.startswith("-A ") or (line.startswith("# Table ") and "incompatible" in line)
        for line in save_text.splitlines()
    )


# -- one family ---------------------------------------------------------------


def run_family(job: FamilyJob) -> list[FamilyReport]:
    """Plan and apply one family in the current process (after entering the namespace)."""
    if job.netns:
        enter_netns(job.netns)
    family = job.family
    skipped = _not_captured(job)
    if skipped and job.mode == "dry-run":
        return [FamilyReport(family, "skipped", "-", skipped, "")]
    if skipped:
        return _drop_stale(job, skipped)
    desired = None if job.mode == "cleanup" else desired_ruleset(job.options, family)
    if job.mode == "dry-run":
        assert desired is not None
        return [FamilyReport(family, "planned", "-", "nothing was changed", desired.restore_text())]
    backends = choose_backends(family, job.backend, job.mode, job.check_only)
    if job.check_only:
        for backend in backends:
            plan_changes(desired, parse_save(backend.read()), family, backend.save)  # Conflict
        return []
    reports = [_converge(backend, desired, family) for backend in backends]
    if job.mode == "apply":
        reports = [_warn_if_ours_elsewhere(report) for report in reports]
    return reports


def _not_captured(job: FamilyJob) -> str:
    """Why *job*'s family is not to be captured ("" if it is)."""
    if job.family != 6 or job.mode == "cleanup":
        return ""
    if job.ipv6 == "off":
        return "--no-ipv6"
    if job.ipv6 == "auto" and not has_global_ipv6():
        return "the namespace has no global IPv6 address (--ipv6 captures IPv6 anyway)"
    return ""


def _drop_stale(job: FamilyJob, why: str) -> list[FamilyReport]:
    """A family that is not captured holds no capture of ours: rules an
    earlier run left (with --ipv6, or before the address went) would keep
    redirecting with that run's settings, to a port that may be no proxy's
    now. Ours are removed as --cleanup removes them; other tools' rules and
    a table without any rule of ours are left as they are.

    Looking never fails the run (--no-ipv6 is also what one passes where
    IPv6's tables or tools are missing, or broken: nothing of ours can be
    there then, or the captured family must go on all the same) and never
    creates a legacy table. A table it cannot look at (no tools, no
    privilege) or cannot clean (another tool's rule in or into our chains)
    is left as it is, and the family's "skipped" line says so; a warning
    names rules of ours that may still capture there. So the check pass
    has nothing to check here.
    """
    if job.check_only:
        return []
    family = job.family
    unreadable: list[str] = []
    left: list[tuple[str, str]] = []  # (backend, why rules of ours may be left there)
    backends: list[Backend] = []
    try:
        if job.backend == "legacy" and legacy_nat_exists(family) is False:
            backends = [NoLegacyTable(family)]
        else:
            backends = choose_backends(family, job.backend, "cleanup")
    except InitError as exc:
        if exc.code == ExitCode.PRIVILEGE:
            where = f"{'iptables' if family == 4 else 'ip6tables'}-{job.backend}"
            left.append(("-" if job.backend == "auto" else where, exc.message))
        elif exc.code == ExitCode.ENVIRONMENT:
            unreadable.append(exc.message)
        else:
            raise
    reports = []
    for backend in backends:
        try:
            state = parse_save(backend.read())
            if not any(rule.is_ours for rule in state.rules):
                continue
            report = _converge(backend, None, family)  # Conflict: nothing was changed
        except InitError as exc:
            if exc.code == ExitCode.ENVIRONMENT:
                unreadable.append(exc.message)
            elif exc.code in (ExitCode.CONFLICT, ExitCode.PRIVILEGE):
                left.append((backend.name, exc.message))
            else:
                raise
            continue
        summary = f"IPv{family} is not captured ({why}), so our rules of an earlier run "
        reports.append(
            dataclasses.replace(report, summary=summary + f"were removed: {report.summary}")
        )
    if unreadable:
        why += f"; not looked at for rules of ours: {'; '.join(unreadable)}"
    if left:
        where = left[0][0]
        warning = (
            f"IPv{family} rules of ours from an earlier run were left in "
            f"{' and '.join(name for name, _ in left if name != '-') or 'its nat table'}, "
            f"where they may still capture with that run's settings: "
            f"{'; '.join(message for _, message in left)}; then run this l4proxy-init "
            f"command again to remove them (--cleanup would remove IPv4's rules too)"
        )
        reports.append(FamilyReport(family, "skipped", where, why, "", warning))
    elif not reports:
        where = backends[0].name if job.backend != "auto" and backends else "-"
        reports = [FamilyReport(family, "skipped", where, why, "")]
    if job.backend != "auto":
        reports = [_warn_if_ours_elsewhere(report) for report in reports]
    return reports


def _warn_if_ours_elsewhere(report: FamilyReport) -> FamilyReport:
    """Rules of ours in the other backend still capture (the kernel runs both):
    say so, since an explicit --backend may have left them behind."""
    prefix = "iptables" if report.family == 4 else "ip6tables"
    other = f"{prefix}-legacy" if report.backend.endswith("-nft") else f"{prefix}-nft"
    if shutil.which(f"{other}-save") is None:
        return report
    if other.endswith("-legacy") and legacy_nat_exists(report.family) is False:
        return report  # nothing there, and reading would create the table
    result = subprocess.run(
        [f"{other}-save", "-t", "nat"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 or not parse_save(result.stdout).our_lines():
        return report
    warning = (
        f"IPv{report.family} rules of ours are also in {other}, where they still "
        f"capture; remove them with: l4proxy-init --cleanup --backend "
        f"{other.rsplit('-', 1)[1]}"
    )
    return dataclasses.replace(
        report, warning=f"{report.warning}; {warning}" if report.warning else warning
    )


def _converge(backend: Backend, desired: RuleSet | None, family: Family) -> FamilyReport:
    want = desired.save_lines() if desired else []
    for _attempt in range(COMMIT_ATTEMPTS):
        with backend.transaction():
            changes = plan_changes(desired, parse_save(backend.read()), family, backend.save)
            if not changes:
                break
            try:
                backend.apply(changes)
            except RetryCommit:
                continue
            break
    else:
        raise InitError(
            ExitCode.APPLY,
            f"the IPv{family} nat table kept changing while we committed "
            f"({COMMIT_ATTEMPTS} attempts); is another tool rewriting it in a loop?",
        )
    final = backend.read()
    got = parse_save(final).our_lines()
    if got != want:
        extra = [line for line in got if line not in want]
        missing = [line for line in want if line not in got]
        raise InitError(
            ExitCode.APPLY,
            f"after apply the IPv{family} nat table ({backend.name}) differs from the plan "
            f"(unexpected: {extra[:1]}, missing: {missing[:1]}); the commit went through, "
            "so these rules are live; please report this",
        )
    if not changes:
        status: Literal["installed", "unchanged", "removed"] = "unchanged"
        summary = (
            "nothing of ours was there"
            if desired is None
            else "already as planned, nothing changed"
        )
    else:
        status = "removed" if desired is None else "installed"
        summary = describe(changes)
    return FamilyReport(family, status, backend.name, summary, final)


# -- process per family -------------------------------------------------------


def _family_process(job: FamilyJob, conn: Connection) -> None:
    try:
        conn.send(("ok", run_family(job)))
    except InitError as exc:
        conn.send(("error", int(exc.code), exc.message))
    except BaseException:  # reported to the parent as a bug
        conn.send(("crash", 0, traceback.format_exc()))
    finally:
        conn.close()


def _in_own_process(job: FamilyJob) -> list[FamilyReport]:
    # fork is quick and inherits nothing that matters as long as this process
    # never loaded iptc; if a caller did, a spawned interpreter is clean.
    ctx: Any = multiprocessing.get_context("spawn" if "iptc" in sys.modules else "fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_family_process, args=(job, child_end), daemon=True)
    process.start()
    child_end.close()
    try:
        message = parent_end.recv()
    except EOFError:
        message = ("crash", 0, f"the IPv{job.family} process died (exit status {process.exitcode})")
    process.join()
    if message[0] == "ok":
        reports: list[FamilyReport] = message[1]
        return reports
    if message[0] == "error":
        raise InitError(ExitCode(message[1]), message[2])
    raise InitError(
        ExitCode.INTERNAL, f"internal error in the IPv{job.family} process:\n{message[2]}"
    )


def run(
    mode: Mode,
    options: CaptureOptions,
    netns: str | None,
    ipv6: IPv6Choice,
    backend: BackendChoice,
    on_report: Callable[[FamilyReport], None] | None = None,
) -> list[FamilyReport]:
    """Plan (and unless dry-run, apply) IPv4 then IPv6; stop at the first error.

    Every family is read and checked before any is changed, so that a
    refusal (exit 3, 4, 5) means nothing was touched. *on_report* gets each
    report as soon as its family is done: if a later family then fails, what
    was already applied has been said.
    """
    path = resolve_netns(netns) if netns is not None else None
    if mode != "dry-run":
        check_privileges()
    # --no-ipv6 still visits IPv6 (unless dry-run): to remove our stale rules
    families: list[Family] = [4] if ipv6 == "off" and mode == "dry-run" else [4, 6]
    jobs = [FamilyJob(family, mode, options, path, ipv6, backend) for family in families]
    if mode != "dry-run":
        for job in jobs:
            _in_own_process(dataclasses.replace(job, check_only=True))
    reports: list[FamilyReport] = []
    for job in jobs:
        for report in _in_own_process(job):
            reports.append(report)
            if on_report is not None:
                on_report(report)
    return reports

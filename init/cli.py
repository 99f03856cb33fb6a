"""``l4proxy-init``: the init container's command line (istio-iptables compatible flags)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .apply import BackendChoice, FamilyReport, IPv6Choice, Mode, run
from .errors import ExitCode, InitError, UsageError
from .options import (
    CaptureOptions,
    parse_cidr_selection,
    parse_cidrs,
    parse_ids,
    parse_netns,
    parse_port,
    parse_port_selection,
    parse_ports,
)

PROG = "l4proxy-init"

DESCRIPTION = """\
Install iptables nat REDIRECT rules in a pod's network namespace so that every
TCP connection not owned by the proxy's UID reaches the l4proxy sidecar:
outbound connections (nat OUTPUT) go to -p, inbound ones (nat PREROUTING) to
-z. Localhost traffic and the app calling its own pod IP are not captured.
Safe to run again: an unchanged plan changes nothing, a changed one replaces
our chains (L4PROXY_*), and rules of other tools are never touched."""

EPILOG = """\
examples:
  # what the seed tutorial's init container runs (istio/proxy_init:0.7.1 args)
  l4proxy-init -p 15001 -u 1337

  # see the rules without touching anything (iptables-save syntax)
  l4proxy-init -p 15001 -u 1337 --dry-run

  # Istio-style: inbound to 15006, leave the metrics port and the cloud
  # metadata server alone
  l4proxy-init -p 15001 -z 15006 -u 1337 -d 15090 -x 169.254.169.254/32

  # capture only port 8080 inbound and only the service range outbound
  l4proxy-init -p 15001 -u 1337 -b 8080 -i 10.96.0.0/12

  # from the node, into a named namespace (ip netns) or a process's one
  l4proxy-init --netns pod1 -p 15001 -u 1337
  l4proxy-init --netns /proc/4242/ns/net -p 15001 -u 1337

  # remove everything l4proxy-init installed (both backends)
  l4proxy-init --cleanup --netns pod1

exit codes:
  0 done   2 bad flag or value   3 missing NET_ADMIN/NET_RAW   4 namespace,
  libxtables or iptables backend missing   5 conflicting chain not ours
  6 the kernel refused the change   1 internal error
  (every family is checked before any is changed: on 2-5 nothing was touched;
  each family is atomic, and one applied before a 6 is reported above it)

See docs/init.md for the rule layout and troubleshooting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every other error we print.
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    capture = p.add_argument_group("capture (istio-iptables flags)")
    capture.add_argument(
        "-p",
        "--proxy-port",
        metavar="PORT",
        default="15001",
        help="port outbound TCP is redirected to (default 15001)",
    )
    capture.add_argument(
        "-z",
        "--inbound-capture-port",
        metavar="PORT",
        default=None,
        help="port inbound TCP is redirected to (default: the -p port)",
    )
    capture.add_argument(
        "-u",
        "--proxy-uid",
        metavar="UIDS",
        default="1337",
        help="comma-separated UIDs whose connections are never captured: the proxy's "
        "(default 1337)",
    )
    capture.add_argument(
        "-g",
        "--proxy-gid",
        metavar="GIDS",
        default="",
        help="comma-separated GIDs whose connections are never captured (default none)",
    )
    capture.add_argument(
        "-m",
        "--inbound-interception-mode",
        metavar="MODE",
        default="REDIRECT",
        help="REDIRECT (the only mode implemented; TPROXY is not)",
    )
    capture.add_argument(
        "-b",
        "--inbound-ports",
        metavar="PORTS",
        default="*",
        help="inbound ports to capture: '*' all (default; SSH 22 is left alone), "
        "a comma-separated list, or '' none",
    )
    capture.add_argument(
        "-d",
        "--inbound-ports-exclude",
        metavar="PORTS",
        default="",
        help="inbound ports never captured (e.g. a health-check port)",
    )
    capture.add_argument(
        "-i",
        "--outbound-cidrs",
        metavar="CIDRS",
        default="*",
        help="destinations whose outbound TCP is captured: '*' all (default), "
        "a comma-separated CIDR list (IPv4 and IPv6 mixed), or '' none",
    )
    capture.add_argument(
        "-x",
        "--outbound-cidrs-exclude",
        metavar="CIDRS",
        default="",
        help="destinations never captured (comma-separated CIDRs)",
    )
    capture.add_argument(
        "-o",
        "--outbound-ports-exclude",
        metavar="PORTS",
        default="",
        help="destination ports never captured outbound",
    )

    run_group = p.add_argument_group("what to do")
    what = run_group.add_mutually_exclusive_group()
    what.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="print the rules in iptables-save syntax and change nothing",
    )
    what.add_argument(
        "--cleanup",
        "--cleanup-only",
        action="store_true",
        help="remove every chain and rule l4proxy-init installed, and nothing else",
    )
    run_group.add_argument(
        "--netns",
        metavar="NAME|PATH",
        help="act in this network namespace: a name from `ip netns` or a path "
        "(/proc/PID/ns/net); default: the current one",
    )
    v6 = run_group.add_mutually_exclusive_group()
    v6.add_argument(
        "--ipv6",
        dest="ipv6",
        action="store_const",
        const="on",
        help="also capture IPv6 (default: only if the namespace has a global IPv6 address; "
        "when IPv6 is not captured, IPv6 rules of ours from an earlier run are removed)",
    )
    v6.add_argument(
        "--no-ipv6",
        dest="ipv6",
        action="store_const",
        const="off",
        help="do not capture IPv6 (IPv6 rules of ours from an earlier run are removed; "
        "--cleanup still cleans both families)",
    )
    p.set_defaults(ipv6="auto")
    run_group.add_argument(
        "--backend",
        choices=("legacy", "nft", "auto"),
        default="auto",
        help="legacy: x_tables via python-iptables; nft: iptables-nft-restore; "
        "auto (default): nft if our rules are already there, or if nf_tables' nat table "
        "has rules (also ones written with nft itself) and the legacy one has none, or if "
        "legacy is unsupported; else legacy",
    )
    return p


def options_from(args: argparse.Namespace) -> CaptureOptions:
    """Validate every value before anything is touched."""
    if args.inbound_interception_mode.upper() != "REDIRECT":
        raise UsageError(
            f"-m {args.inbound_interception_mode}: only REDIRECT is implemented "
            f"(TPROXY is not); drop -m or pass -m REDIRECT"
        )
    outbound_port = parse_port(args.proxy_port, "-p")
    inbound_port = (
        outbound_port
        if args.inbound_capture_port is None
        else parse_port(args.inbound_capture_port, "-z")
    )
    proxy_uids = parse_ids(args.proxy_uid, "-u", "UID")
    proxy_gids = parse_ids(args.proxy_gid, "-g", "GID")
    if not proxy_uids and not proxy_gids:
        # No owner exemption: the proxy's own upstream connections would be
        # captured and sent back to it, for ever (an empty templated value).
        raise UsageError(
            f"-u {args.proxy_uid!r} -g {args.proxy_gid!r}: no UID or GID left to exempt; "
            "the proxy's own connections would loop back to it (pass -u 1337)"
        )
    return CaptureOptions(
        outbound_port=outbound_port,
        inbound_port=inbound_port,
        proxy_uids=proxy_uids,
        proxy_gids=proxy_gids,
        inbound_ports=parse_port_selection(args.inbound_ports, "-b"),
        inbound_ports_exclude=parse_ports(args.inbound_ports_exclude, "-d"),
        outbound_cidrs=parse_cidr_selection(args.outbound_cidrs, "-i"),
        outbound_cidrs_exclude=parse_cidrs(args.outbound_cidrs_exclude, "-x"),
        outbound_ports_exclude=parse_ports(args.outbound_ports_exclude, "-o"),
    )


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _show(report: FamilyReport, netns: str | None) -> None:
    """One family's outcome: its line on stderr, its table on stdout."""
    where = f"IPv{report.family} nat"
    if report.backend != "-":
        where += f" ({report.backend})"
    _say(f"{where}: {report.status}: {report.summary}")
    if report.warning:
        warning = report.warning
        if netns and "l4proxy-init --cleanup" in warning:
            # run as written on the node, it would clean the node's own namespace
            warning = warning.replace(
                "l4proxy-init --cleanup", f"l4proxy-init --netns {netns} --cleanup"
            )
        _say(f"warning: {warning}")
    if report.status == "planned":
        print(f"# {PROG} --dry-run: IPv{report.family} nat rules (nothing was changed)")
    if report.ruleset:
        sys.stdout.write(report.ruleset)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode: Mode = "dry-run" if args.dry_run else "cleanup" if args.cleanup else "apply"
    ipv6: IPv6Choice = args.ipv6
    backend: BackendChoice = args.backend
    try:
        options = options_from(args)
        netns = parse_netns(args.netns)
        # Each family is shown as soon as it is done: if IPv6 then fails,
        # the IPv4 line above the error says what was applied.
        run(mode, options, netns, ipv6, backend, on_report=lambda r: _show(r, netns))
    except InitError as exc:
        _say(f"error: {exc.message}")
        return int(exc.code)
    return int(ExitCode.OK)

"""The capture plan: options (and the table as it is now) in, rules and changes out.

Pure: nothing here touches the kernel, so every decision about which rule
goes where is tested without root (tests/test_init_plan.py).

Theory of operation
-------------------
:func:`desired_ruleset` turns :class:`~l4proxy_init.options.CaptureOptions`
into the rules one address family's ``nat`` table must hold: four chains of
our own and one jump into them from each of PREROUTING and OUTPUT. Every rule
carries ``-m comment --comment l4proxy/<purpose>``; the comment is how a later
run (or ``--cleanup``) recognises its own rules among other tools' ones.

:func:`parse_save` reads an ``iptables-save -t nat`` dump into a
:class:`TableState`. :func:`plan_changes` compares our part of that state
with the desired rules, chain by chain, and returns the smallest list of
:class:`Change` that makes them equal: nothing at all when they already are
(so a re-run after a pod restart is a no-op, istio/istio#16768), a flush and
refill for one of our chains that differs, delete-and-append for our jumps in
a built-in chain. A chain with our name holding a rule we did not write is a
:class:`Conflict`, never overwritten.

The rule texts are rendered exactly as ``iptables-save`` prints them (option
order ``-d -o -p -m ... -j``, comment quoted), for both iptables-legacy and
iptables-nft: plan and kernel are compared as text, and ``--dry-run`` prints
the very lines the kernel will show after apply.

Rule order in L4PROXY_OUTPUT (why it is what it is)
----------------------------------------------------
1. proxy UIDs/GIDs RETURN first. The sidecar forwards an inbound connection
   to its original destination, the pod's own IP, as UID 1337 over ``lo``.
   Istio 0.7.1 sent ``-o lo ! -d 127.0.0.1`` to the redirect *before* its
   owner check, so that forward came back to the proxy: a loop
   (istio/istio#14443). Nothing the proxy sends ever returns to it here.
2. ``-o lo`` RETURN: localhost, and the app calling its own pod IP (which the
   kernel also routes over ``lo``), are not captured; such a connection
   reaches the app directly, as it would without a mesh (istio/istio#14738).
3. excluded CIDRs, then excluded ports, RETURN.
4. everything else (or only the ``-i`` CIDRs) jumps to L4PROXY_REDIRECT.

Inbound, L4PROXY_INBOUND returns for SSH (22, as istio-iptables does with
``-b '*'``) and the ``-d`` ports, then jumps to L4PROXY_IN_REDIRECT. Traffic
the pod sends to itself never reaches PREROUTING's nat chain: its connection
was already classified in OUTPUT.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import ExitCode, InitError
from .options import ALL, CaptureOptions, Family, IPNetwork, networks_of

CHAIN_INBOUND = "L4PROXY_INBOUND"
CHAIN_IN_REDIRECT = "L4PROXY_IN_REDIRECT"
CHAIN_OUTPUT = "L4PROXY_OUTPUT"
CHAIN_REDIRECT = "L4PROXY_REDIRECT"
#: Sorted: the order iptables-save lists user chains in.
OUR_CHAINS = tuple(sorted((CHAIN_INBOUND, CHAIN_IN_REDIRECT, CHAIN_OUTPUT, CHAIN_REDIRECT)))
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
COMMENT_PREFIX = "l4proxy/"
SSH_PORT = 22


class Conflict(InitError):
    """Something that is not ours sits where our rules must go."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.CONFLICT, message)

    def __reduce__(self) -> tuple[type[InitError], tuple[ExitCode, str]]:
        return (InitError, (self.code, self.message))


@dataclass(frozen=True)
class Rule:
    """One rule of ours; its fields are the few iptables options we use."""

    chain: str
    purpose: str
    jump: str
    destination: str | None = None
    out_interface: str | None = None
    tcp: bool = False
    dport: int | None = None
    uid_owner: int | None = None
    gid_owner: int | None = None
    to_port: int | None = None

    @property
    def comment(self) -> str:
        return COMMENT_PREFIX + self.purpose

    def save_line(self) -> str:
        """The rule as ``iptables-save`` prints it."""
        words = ["-A", self.chain]
        if self.destination:
            words += ["-d", self.destination]
        if self.out_interface:
            words += ["-o", self.out_interface]
        if self.tcp or self.dport is not None:
            words += ["-p", "tcp"]
        if self.dport is not None:
            words += ["-m", "tcp", "--dport", str(self.dport)]
        if self.uid_owner is not None:
            words += ["-m", "owner", "--uid-owner", str(self.uid_owner)]
        if self.gid_owner is not None:
            words += ["-m", "owner", "--gid-owner", str(self.gid_owner)]
        words += ["-m", "comment", "--comment", f'"{self.comment}"', "-j", self.jump]
        if self.to_port is not None:
            words += ["--to-ports", str(self.to_port)]
        return " ".join(words)


@dataclass(frozen=True)
class RuleSet:
    """Our chains and rules for one family's nat table, in iptables-save order."""

    family: Family
    chains: tuple[str, ...]
    rules: tuple[Rule, ...]

    def rules_in(self, chain: str) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.chain == chain)

    def save_lines(self) -> list[str]:
        return _canonical(
            self.chains, [(rule.chain, rule.save_line()) for rule in self.rules], BUILTIN_CHAINS
        )

    def restore_text(self) -> str:
        """A complete ``iptables-restore --noflush`` input for this rule set."""
        return "*nat\n" + "".join(line + "\n" for line in self.save_lines()) + "COMMIT\n"


def desired_ruleset(options: CaptureOptions, family: Family) -> RuleSet:
    """The rules one family's nat table must hold for *options*."""
    rules = [
        Rule("PREROUTING", "inbound", CHAIN_INBOUND, tcp=True),
        Rule("OUTPUT", "outbound", CHAIN_OUTPUT, tcp=True),
    ]

    # Inbound: connections from other pods to this pod's addresses.
    if options.inbound_ports == ALL:
        excluded = dict.fromkeys((SSH_PORT, *options.inbound_ports_exclude))
        for port in excluded:
            purpose = "inbound-ssh" if port == SSH_PORT else "inbound-exclude-port"
            rules.append(Rule(CHAIN_INBOUND, purpose, "RETURN", dport=port))
        rules.append(Rule(CHAIN_INBOUND, "inbound-capture", CHAIN_IN_REDIRECT))
    else:
        for port in options.inbound_ports:
            if port not in options.inbound_ports_exclude:
                rules.append(Rule(CHAIN_INBOUND, "inbound-port", CHAIN_IN_REDIRECT, dport=port))
    rules.append(
        Rule(
            CHAIN_IN_REDIRECT,
            "redirect-inbound",
            "REDIRECT",
            tcp=True,
            to_port=options.inbound_port,
        )
    )

    # Outbound: connections this pod's processes open. Order matters; see the
    # module docstring.
    for uid in options.proxy_uids:
        rules.append(Rule(CHAIN_OUTPUT, "proxy-uid", "RETURN", uid_owner=uid))
    for gid in options.proxy_gids:
        rules.append(Rule(CHAIN_OUTPUT, "proxy-gid", "RETURN", gid_owner=gid))
    rules.append(Rule(CHAIN_OUTPUT, "loopback", "RETURN", out_interface="lo"))
    for net in networks_of(options.outbound_cidrs_exclude, family):
        rules.append(Rule(CHAIN_OUTPUT, "exclude-cidr", "RETURN", destination=_destination(net)))
    for port in options.outbound_ports_exclude:
        rules.append(Rule(CHAIN_OUTPUT, "exclude-port", "RETURN", dport=port))
    if options.outbound_cidrs == ALL:
        rules.append(Rule(CHAIN_OUTPUT, "outbound-capture", CHAIN_REDIRECT))
    else:
        for net in networks_of(options.outbound_cidrs, family):
            rules.append(
                Rule(CHAIN_OUTPUT, "outbound-cidr", CHAIN_REDIRECT, destination=_destination(net))
            )
    rules.append(
        Rule(
            CHAIN_REDIRECT, "redirect-outbound", "REDIRECT", tcp=True, to_port=options.outbound_port
        )
    )
    return RuleSet(family=family, chains=OUR_CHAINS, rules=_in_save_order(rules))


def _destination(net: IPNetwork) -> str | None:
    """*net* as ``iptables-save`` prints a rule's ``-d``: nothing for a /0
    (it matches every address, and iptables leaves the option out), and an
    IPv6 address as glibc's inet_ntop writes it (``::ffff:10.0.0.0``, where
    Python writes ``::ffff:a00:0``). The rules are checked against the
    kernel's table after apply: a different spelling read as "differs from
    the plan", exit 6, on every run (the init container crash-looped)."""
    if net.prefixlen == 0:
        return None
    if net.version == 6:
        return f"{socket.inet_ntop(socket.AF_INET6, net.network_address.packed)}/{net.prefixlen}"
    return net.with_prefixlen


def _in_save_order(rules: list[Rule]) -> tuple[Rule, ...]:
    # Built-in chains first in kernel order, then user chains by name; stable
    # within a chain (the rule order is the meaning).
    def key(rule: Rule) -> tuple[int, int, str]:
        if rule.chain in BUILTIN_CHAINS:
            return (0, BUILTIN_CHAINS.index(rule.chain), "")
        return (1, 0, rule.chain)

    return tuple(sorted(rules, key=key))


# -- reading the table --------------------------------------------------------


@dataclass(frozen=True)
class SavedRule:
    """One ``-A`` line of a dump, with what we need to know about it."""

    chain: str
    line: str
    comment: str | None
    jump: str | None

    @property
    def is_ours(self) -> bool:
        return self.comment is not None and self.comment.startswith(COMMENT_PREFIX)


@dataclass(frozen=True)
class TableState:
    """A nat table as ``iptables-save -t nat`` printed it."""

    chains: tuple[str, ...] = ()
    rules: tuple[SavedRule, ...] = field(default=())

    def rules_in(self, chain: str) -> list[SavedRule]:
        return [rule for rule in self.rules if rule.chain == chain]

    def our_lines(self) -> list[str]:
        """Our chains and rules, ordered as :meth:`RuleSet.save_lines` orders them."""
        ours = [c for c in self.chains if c in OUR_CHAINS]
        rules = [(r.chain, r.line) for r in self.rules if r.is_ours or r.chain in OUR_CHAINS]
        return _canonical(ours, rules, self.chains)

    def foreign_lines(self) -> list[str]:
        """Everything that is not ours (what --cleanup must leave as it is)."""
        chains = [c for c in self.chains if c not in OUR_CHAINS]
        rules = [r.line for r in self.rules if not (r.is_ours or r.chain in OUR_CHAINS)]
        return chains + rules


def _canonical(
    chains: Iterable[str], rules: Sequence[tuple[str, str]], chain_order: Sequence[str]
) -> list[str]:
    # Declarations sorted, then rules grouped by chain: built-ins in the
    # dump's order, ours by name. iptables-legacy and iptables-nft agree on
    # the lines but not always on the order of user chains.
    order = [*BUILTIN_CHAINS, *(c for c in chain_order if c not in BUILTIN_CHAINS)]

    def key(chain: str) -> tuple[int, int, str]:
        if chain in OUR_CHAINS:
            return (1, 0, chain)
        return (0, order.index(chain) if chain in order else len(order), chain)

    lines = [f":{chain} - [0:0]" for chain in sorted(chains)]
    for chain in sorted({chain for chain, _ in rules}, key=key):
        lines += [line for c, line in rules if c == chain]
    return lines


def parse_save(text: str) -> TableState:
    """Read the ``*nat`` section of an iptables-save dump."""
    chains: list[str] = []
    rules: list[SavedRule] = []
    in_nat = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat:
            continue
        elif line == "COMMIT":
            in_nat = False
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append(_saved_rule(line))
    return TableState(chains=tuple(chains), rules=tuple(rules))


def split_rule(line: str) -> list[str]:
    """The words of a dump line, as ``iptables-restore`` splits it.

    Not shell quoting: iptables-save prints chain names, interface names and
    targets bare, whatever they contain (``-A it's -o e'0``), and quotes an
    option's value with ``"`` only when it needs it, escaping ``"``, ``\\``
    and ``'`` inside with a backslash. Like add_param_to_argv() in iptables'
    xshared.c: a ``"`` opens a quote anywhere in a word and the closing ``"``
    ends the word (``""`` is one empty word); a backslash escapes the next
    character inside quotes only; blanks outside quotes separate words.
    A quote left open (only a bare name containing ``"`` can do that; no
    restore could read such a dump) falls back to splitting on blanks.
    """
    words: list[str] = []
    word: list[str] = []
    quote_open = escaped = False
    for char in line:
        if quote_open:
            if escaped:
                word.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quote_open = False
                words.append("".join(word))
                word = []
            else:
                word.append(char)
        elif char == '"':
            quote_open = True
        elif char in " \t\n":
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if quote_open:
        return line.split()
    if word:
        words.append("".join(word))
    return words


def _saved_rule(line: str) -> SavedRule:
    words = split_rule(line)
    comment = jump = None
    i = 2
    while i < len(words) - 1:
        if words[i] == "--comment":
            comment = words[i + 1]
            i += 1  # a value, even one that reads "-j", is no option
        elif words[i] in ("-j", "-g", "--jump", "--goto"):
            jump = words[i + 1]
            i += 1
        i += 1
    # The chain is printed bare (names hold no blanks): the second raw word.
    return SavedRule(chain=line.split()[1], line=line, comment=comment, jump=jump)


# -- changes ------------------------------------------------------------------


@dataclass(frozen=True)
class CreateChain:
    chain: str


@dataclass(frozen=True)
class FlushChain:
    chain: str


@dataclass(frozen=True)
class DeleteRule:
    """Delete one of our rules from a chain that is not ours.

    *line* is its dump text (``-D`` for a restore file); apply through
    python-iptables finds it by *comment*, which our rules in a built-in chain
    never share.
    """

    chain: str
    line: str
    comment: str


@dataclass(frozen=True)
class AppendRule:
    rule: Rule


@dataclass(frozen=True)
class DeleteChain:
    chain: str


Change = CreateChain | FlushChain | DeleteRule | AppendRule | DeleteChain


def check_conflicts(state: TableState, family: Family, save: str | None = None) -> None:
    """Refuse to touch a table where our names are taken by someone else.

    *save* is the command that shows the table (the backend's own, e.g.
    ``ip6tables-legacy-save``: Debian's plain iptables-save shows only nft).
    """
    save = save or ("iptables-save" if family == 4 else "ip6tables-save")
    for rule in state.rules:
        if rule.chain in OUR_CHAINS and not rule.is_ours:
            raise Conflict(
                f"chain {rule.chain} in the IPv{family} nat table holds a rule that "
                f"l4proxy-init did not write ({rule.line}); another tool uses that name: "
                f"remove the chain or that tool (see: {save} -t nat)"
            )
        if rule.jump in OUR_CHAINS and rule.chain not in OUR_CHAINS and not rule.is_ours:
            raise Conflict(
                f"a rule that l4proxy-init did not write jumps to our chain {rule.jump} "
                f"in the IPv{family} nat table ({rule.line}); remove it first "
                f"(see: {save} -t nat)"
            )


def plan_changes(
    desired: RuleSet | None, state: TableState, family: Family, save: str | None = None
) -> tuple[Change, ...]:
    """What turns *state* into *desired* (``None``: remove all of ours).

    Chains that already match are left alone, so that applying an unchanged
    plan is a no-op and our jumps keep their place among other tools' rules.
    Raises :class:`Conflict` (also for a removal: flushing a chain that holds
    someone else's rules would destroy them), naming *save* as the command
    that shows the table.
    """
    check_conflicts(state, family, save)
    creates: list[Change] = []
    flushes: list[Change] = []
    deletes: list[Change] = []
    appends: list[Change] = []
    drops: list[Change] = []
    wanted_chains = desired.chains if desired else ()
    wanted_rules = desired.rules if desired else ()

    for chain in OUR_CHAINS:
        want = [r for r in wanted_rules if r.chain == chain]
        have = [r.line for r in state.rules_in(chain)]
        exists = chain in state.chains
        if chain in wanted_chains:
            if not exists:
                creates.append(CreateChain(chain))
            elif have != [r.save_line() for r in want]:
                flushes.append(FlushChain(chain))
            else:
                continue
            appends += [AppendRule(r) for r in want]
        elif exists:
            flushes.append(FlushChain(chain))
            drops.append(DeleteChain(chain))

    other_chains = [c for c in state.chains if c not in OUR_CHAINS]
    other_chains += [c for c in BUILTIN_CHAINS if c not in other_chains]
    for chain in other_chains:
        jumps = [r for r in wanted_rules if r.chain == chain]
        present = [r for r in state.rules_in(chain) if r.is_ours]
        if [r.line for r in present] == [r.save_line() for r in jumps]:
            continue
        deletes += [DeleteRule(chain, r.line, r.comment or "") for r in present]
        appends += [AppendRule(r) for r in jumps]

    # Order inside the one transaction: chains exist before rules name them;
    # jumps are gone before the chains they point to are deleted.
    return (*creates, *flushes, *deletes, *appends, *drops)


def restore_text(changes: Sequence[Change]) -> str:
    """*changes* as ``iptables-restore --noflush`` input (one atomic commit)."""
    lines = ["*nat"]
    for change in changes:
        if isinstance(change, CreateChain):
            lines.append(f":{change.chain} - [0:0]")
        elif isinstance(change, FlushChain):
            lines.append(f"-F {change.chain}")
        elif isinstance(change, DeleteRule):
            lines.append("-D" + change.line[2:])
        elif isinstance(change, AppendRule):
            lines.append(change.rule.save_line())
        else:
            lines.append(f"-X {change.chain}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def describe(changes: Sequence[Change]) -> str:
    """A short summary for the log line, e.g. "2 chains created, 9 rules added"."""
    counts = {
        "chains created": sum(isinstance(c, CreateChain) for c in changes),
        "chains flushed": sum(isinstance(c, FlushChain) for c in changes),
        "chains deleted": sum(isinstance(c, DeleteChain) for c in changes),
        "rules deleted": sum(isinstance(c, DeleteRule) for c in changes),
        "rules added": sum(isinstance(c, AppendRule) for c in changes),
    }
    return ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "no change"

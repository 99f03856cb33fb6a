"""What the user asked for: validated capture options, no I/O.

The value syntax follows istio-iptables so that existing pod specs keep
working: comma-separated lists, ``*`` meaning "all" where Istio accepts it,
an empty string meaning "none". Every value is checked here, before any
namespace is entered or any table is read, so that a typo never leaves a pod
half-configured.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, TypeVar

from .errors import UsageError

ALL: Literal["*"] = "*"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Family = Literal[4, 6]

T = TypeVar("T")

MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel, so it is not an id


@dataclass(frozen=True)
class CaptureOptions:
    """The capture policy for one pod; one plan per address family is made from it."""

    outbound_port: int = 15001
    inbound_port: int = 15001
    proxy_uids: tuple[int, ...] = (1337,)
    proxy_gids: tuple[int, ...] = ()
    inbound_ports: Literal["*"] | tuple[int, ...] = ALL
    inbound_ports_exclude: tuple[int, ...] = ()
    outbound_cidrs: Literal["*"] | tuple[IPNetwork, ...] = ALL
    outbound_cidrs_exclude: tuple[IPNetwork, ...] = ()
    outbound_ports_exclude: tuple[int, ...] = ()


def parse_port(text: str, flag: str) -> int:
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise UsageError(f"{flag}: {text!r} is not a TCP port (expected a number 1-65535)")
    return int(value)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _unique(values: list[T]) -> tuple[T, ...]:
    # Keep the user's order (it is the rule order) but drop repeats.
    return tuple(dict.fromkeys(values))


def parse_ports(text: str, flag: str) -> tuple[int, ...]:
    """``"8080,9090"`` -> (8080, 9090); ``""`` -> ()."""
    return _unique([parse_port(item, flag) for item in _items(text)])


def parse_port_selection(text: str, flag: str) -> Literal["*"] | tuple[int, ...]:
    """Like :func:`parse_ports`, and ``*`` selects every port."""
    if text.strip() == ALL:
        return ALL
    return parse_ports(text, flag)


def parse_ids(text: str, flag: str, what: str) -> tuple[int, ...]:
    """A comma-separated list of numeric UIDs or GIDs."""
    ids = []
    for item in _items(text):
        if not (item.isascii() and item.isdigit()) or int(item) > MAX_ID:
            raise UsageError(
                f"{flag}: {item!r} is not a numeric {what} (expected 0-{MAX_ID}; "
                f"names are not resolved because the pod's /etc/passwd is not ours)"
            )
        ids.append(int(item))
    return _unique(ids)


def parse_cidrs(text: str, flag: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8,fd00::/8"``; a bare address means that one host."""
    nets: list[IPNetwork] = []
    for item in _items(text):
        if "%" in item:
            # ipaddress keeps fe80::1%eth0 as a scoped address, but an
            # iptables rule has no zone: it would silently become fe80::1/128
            # on every interface.
            raise UsageError(
                f"{flag}: {item!r} has an IPv6 zone index (%...), which an iptables rule "
                f"cannot match; pass the address without it (e.g. fe80::1/128)"
            )
        try:
            # strict=False: iptables itself masks the host bits (10.1.2.3/8
            # is 10.0.0.0/8), and users copy such values from `ip addr`.
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise UsageError(
                f"{flag}: {item!r} is not an IPv4 or IPv6 CIDR (expected e.g. 10.0.0.0/8)"
            ) from None
    return _unique(nets)


def parse_cidr_selection(text: str, flag: str) -> Literal["*"] | tuple[IPNetwork, ...]:
    if text.strip() == ALL:
        return ALL
    return parse_cidrs(text, flag)


def parse_netns(text: str | None) -> str | None:
    """``--netns``: ``None`` (not given) means the current namespace; an empty
    or blank value is an error, never the current namespace: it is what
    ``--netns "$POD_NETNS"`` passes when the variable is unset, and run from
    the node that would capture the node's own traffic."""
    if text is not None and not text.strip():
        raise UsageError(
            f"--netns: empty namespace name ({text!r}; an unset variable?): pass a name "
            f"from `ip netns list` or a path like /proc/PID/ns/net, or leave --netns out "
            f"to act in the current namespace"
        )
    return text


def networks_of(nets: tuple[IPNetwork, ...], family: Family) -> tuple[IPNetwork, ...]:
    """The subset of *nets* that an ``iptables`` (4) or ``ip6tables`` (6) rule can name."""
    return tuple(net for net in nets if net.version == family)

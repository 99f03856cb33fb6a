"""ServiceEntry ``resolution: DNS``: host-name endpoints become address endpoints.

Theory of operation
-------------------
On Kubernetes a sidecar finds the pods of one version through a headless
Service: ``bootcamp-v1.default.svc.cluster.local`` answers with one A record
per ready pod. A ServiceEntry with ``resolution: DNS`` lists such names as
endpoint addresses, each with the labels its pods share (``version: v1``).

The rule loader keeps those endpoints as they are written (``address`` is the
name). :class:`DnsEndpoints` holds one :class:`NameState` per name the loaded
table mentions, refreshes each when its TTL runs out, and
:func:`resolved_table` rewrites the table so that a name becomes one
:class:`~l4proxy.rules.routing.Endpoint` *per address*, same port, same labels. So
round robin, subsets by label and outlier detection see pods, not names. The
rule watcher runs it in a thread, on a copy of the answers
(:func:`answers_of`): the states here are recorded on the event loop.

* A name not resolved yet stays a name; the worker's connect resolves it with
  ``getaddrinfo`` in a thread, so the first seconds after start still route
  (per connection: the per-request relay answers 503 for it, and the sidecar
  is not ready until every name had its first lookup).
* A name a reload adds is looked up before the reloaded table goes live
  (:meth:`DnsEndpoints.first_lookups`, for one query's timeout at most),
  the old table serving meanwhile, as Envoy warms a new cluster.
* An answer (records, or a negative answer: NXDOMAIN / no records) replaces
  the addresses. A headless Service with no ready pod answers NXDOMAIN, and
  then the pods are gone: sending to the old addresses would be wrong.
* A name's A records are its addresses, or its AAAA records when it has no
  A (``Resolver.lookup_family``: IPv6 first on an IPv6-only host; both with
  ``all``). NXDOMAIN in either reply means no address of any type.
* A failure (timeout, SERVFAIL, REFUSED, garbage) keeps the last good
  addresses, is counted in ``/stats`` and shown in ``/clusters``, and is
  retried with a backoff.
* TTLs are honoured between a floor (a TTL of 0 must not turn a thousand
  sidecars into a query flood; CoreDNS serves cluster names with TTL 5) and a
  ceiling (a long TTL must not pin a pod that left).

Why our own client: the stdlib (``getaddrinfo``) does not report TTLs, and a
thread per lookup is what "never block the event loop" would otherwise cost.
:mod:`l4proxy.rules._dnswire` is the sans-IO codec; this module does UDP (TCP when
an answer is truncated) on the running event loop. It reads nameservers,
``search`` and ``options timeout/attempts/ndots`` from ``/etc/resolv.conf``
(then ``LOCALDOMAIN`` and ``RES_OPTIONS`` from the environment) and consults
``/etc/hosts`` first, as glibc's ``files dns`` order does.

Names go through the search list as glibc's ``res_search`` takes them, so a
name resolves here as the app's own connect resolves it: a name with a
trailing dot is looked up as written only; one with ``ndots`` dots or more
(default 1, at most 15) as written first, then with each search domain; one
with fewer dots with each search domain first, then as written. The next is
tried while the answers are NXDOMAIN or no records; a failure (timeout,
SERVFAIL) ends the lookup as a failure. In a Kubernetes pod (``ndots:5``)
``bootcamp-v1.default`` is ``bootcamp-v1.default.svc.cluster.local`` (it was
looked up as written, got NXDOMAIN, and its endpoints vanished), and
``bootcamp-v1.default.svc.cluster.local`` costs three NXDOMAIN round trips
before its answer, as for glibc; written with a trailing dot it costs none.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from l4proxy.rules import _dnswire as wire
from l4proxy.rules._objects import MAX_ENDPOINTS
from l4proxy.rules.routing import Endpoint, RouteTable, Service
from l4proxy.stats import Counters

__all__ = [
    "DEFAULT_MAX_TTL",
    "DEFAULT_MIN_TTL",
    "DnsEndpoints",
    "DnsError",
    "NameState",
    "Resolution",
    "ResolvConf",
    "Resolver",
    "answers_of",
    "dns_names",
    "read_hosts",
    "resolved_table",
    "ttl_bounds_from_env",
]

log = logging.getLogger("l4proxy.dns")

DEFAULT_MIN_TTL = 5.0  # seconds; CoreDNS's default TTL for cluster names
DEFAULT_MAX_TTL = 300.0
MAX_RETRY = 30.0  # a failing name is retried at most this far apart (unless min TTL is larger)
# lookups under way at once (each holds a socket per question): dozens of
# names due together must not take the fds a worker keeps for itself
MAX_LOOKUPS = 8
# the longest the sidecar's readiness waits for the names' first lookups
WARM_WAIT = 10.0
# resolv.conf bounds, as glibc's: search domains used (MAXDNSRCH), ndots
MAX_SEARCH = 6
MAX_NDOTS = 15

DnsError = wire.DnsError


@dataclass(frozen=True)
class ResolvConf:
    """What we use of resolv.conf(5)."""

    nameservers: tuple[str, ...] = ("127.0.0.1",)
    search: tuple[str, ...] = ()
    timeout: float = 5.0
    attempts: int = 2
    ndots: int = 1

    @classmethod
    def parse(cls, text: str) -> ResolvConf:
        servers: list[str] = []
        search: list[str] = []
        timeout, attempts, ndots = 5.0, 2, 1
        for raw in text.splitlines():
            parts = raw.split("#", 1)[0].split(";", 1)[0].split()
            if not parts:
                continue
            key, args = parts[0], parts[1:]
            if key == "nameserver" and args and len(servers) < 3:
                try:
                    servers.append(str(ipaddress.ip_address(args[0].split("%", 1)[0])))
                except ValueError:
                    continue
            elif key in ("search", "domain"):
                # (at most MAX_SEARCH domains, as glibc before 2.26: each is a
                # lookup of its own, every refresh)
                search = [a.rstrip(".") for a in args if a.strip(".")][:MAX_SEARCH]
            elif key == "options":
                for opt in args:
                    name, _, value = opt.partition(":")
                    if not (value.isascii() and value.isdigit()):
                        continue  # ("²".isdigit(), and int() refuses it)
                    if name == "timeout":
                        timeout = float(min(max(int(value), 1), 30))
                    elif name == "attempts":
                        attempts = min(max(int(value), 1), 5)
                    elif name == "ndots":
                        ndots = min(int(value), MAX_NDOTS)
        return cls(tuple(servers) or ("127.0.0.1",), tuple(search), timeout, attempts, ndots)

    @classmethod
    def read(
        cls, path: str = "/etc/resolv.conf", environ: Mapping[str, str] | None = None
    ) -> ResolvConf:
        """The file, then as glibc the environment: ``LOCALDOMAIN`` (the
        search list instead of the file's) and ``RES_OPTIONS`` (options after
        the file's)."""
        env = os.environ if environ is None else environ
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        if "LOCALDOMAIN" in env:
            text += f"\nsearch {env['LOCALDOMAIN']}"
        if "RES_OPTIONS" in env:
            text += f"\noptions {env['RES_OPTIONS']}"
        return cls.parse(text)


def read_hosts(path: str = "/etc/hosts") -> dict[str, list[str]]:
    """Name (lower case, no trailing dot) → addresses in file order."""
    out: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split("#", 1)[0].split()
        if len(parts) < 2:
            continue
        try:
            addr = str(ipaddress.ip_address(parts[0].split("%", 1)[0]))
        except ValueError:
            continue
        for name in parts[1:]:
            addrs = out.setdefault(name.lower().rstrip("."), [])
            if addr not in addrs:
                addrs.append(addr)
    return out


@dataclass(frozen=True)
class Resolution:
    """A lookup's answer: addresses (possibly none) and the TTL to cache it for."""

    addresses: tuple[str, ...]
    ttl: float | None  # None: the answer carried no TTL (hosts file, negative without SOA)
    source: str  # "dns", "hosts"


LOOKUP_FAMILIES = ("auto", "v4_preferred", "v6_preferred", "all")


def _has_route(family: int, probe: str) -> bool:
    """Whether this host can reach *probe* (a documentation address): a UDP
    connect looks the route up and sends nothing."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 53))
    except OSError:
        return False
    return True


class Resolver:
    """A minimal stub resolver: A and AAAA over UDP (TCP on truncation).

    Which addresses a name gives, as Envoy's ``dns_lookup_family``:
    ``v4_preferred`` (its A records, or its AAAA records when it has no A),
    ``v6_preferred`` (the other way round), ``all`` (both). ``auto``, the
    default, is ``v4_preferred`` on a host with an IPv4 route and
    ``v6_preferred`` on an IPv6-only one: Istio gives an IPv4-only pod
    ``V4_ONLY``, and a dual-stack name's AAAA records in round robin there
    were endpoints no connect could reach.
    """

    def __init__(
        self,
        conf: ResolvConf | None = None,
        *,
        resolv_conf: str = "/etc/resolv.conf",
        hosts_file: str = "/etc/hosts",
        port: int = 53,
        lookup_family: str = "auto",
    ) -> None:
        if lookup_family not in LOOKUP_FAMILIES:
            raise ValueError(f"lookup_family {lookup_family!r}: one of {LOOKUP_FAMILIES}")
        self._conf = conf
        self.resolv_conf = resolv_conf
        self.hosts_file = hosts_file
        self.port = port
        self._family = lookup_family

    @property
    def lookup_family(self) -> str:
        if self._family == "auto":
            v4 = _has_route(socket.AF_INET, "192.0.2.1")
            self._family = "v4_preferred" if v4 else "v6_preferred"
        return self._family

    @property
    def conf(self) -> ResolvConf:
        # Re-read on every use: a pod's resolv.conf is fixed, but a test (or a
        # node agent) may rewrite it, and the file is tiny.
        return self._conf if self._conf is not None else ResolvConf.read(self.resolv_conf)

    def candidates(self, name: str, conf: ResolvConf) -> list[str]:
        """Names to try, in order, as glibc's res_search: a name with a
        trailing dot as written only; one with ``ndots`` dots or more as
        written, then with each search domain; one with fewer through the
        search list first, then as written."""
        if name.endswith("."):
            return [name.rstrip(".")]
        searched = [f"{name}.{d}" for d in conf.search]
        if name.count(".") >= conf.ndots:
            return [name, *searched]
        return [*searched, name]

    async def resolve(self, name: str) -> Resolution:
        name = name.lower()
        hosts = read_hosts(self.hosts_file)
        if name.rstrip(".") in hosts:
            return Resolution(tuple(hosts[name.rstrip(".")]), None, "hosts")
        conf = self.conf
        last: Resolution | None = None
        for candidate in self.candidates(name, conf):
            res = await self._lookup(candidate, conf)
            if res.addresses:
                return res
            last = res
        assert last is not None
        return last

    async def _lookup(self, name: str, conf: ResolvConf) -> Resolution:
        """Both questions at once; the answer by the lookup family.

        A failed question is no answer: the last good addresses stay (the
        caller keeps them). But a name that does not exist (NXDOMAIN, in
        either reply) has no address of any type, whatever the other
        question did: a headless Service scaled to zero answers so, and a
        server that never answers AAAA must not keep its pods for ever.
        """
        family = self.lookup_family
        v6_first = family == "v6_preferred"
        first, second = (wire.TYPE_AAAA, wire.TYPE_A) if v6_first else (wire.TYPE_A, wire.TYPE_AAAA)
        got = await asyncio.gather(
            self.query(name, first, conf), self.query(name, second, conf), return_exceptions=True
        )
        answers: list[wire.Answer] = []
        errors: list[BaseException] = []
        for ans in got:
            if isinstance(ans, BaseException):
                if not isinstance(ans, DnsError | OSError | TimeoutError):
                    raise ans
                errors.append(ans)
            else:
                answers.append(ans)
        if any(a.nxdomain for a in answers) and not any(a.addresses for a in answers):
            # (a server that says NXDOMAIN to one type and answers the other
            # is wrong about one of them: the addresses win)
            ttls = [a.ttl for a in answers if a.nxdomain and a.ttl is not None]
            return Resolution((), min(ttls) if ttls else None, "dns")
        preferred, other = got
        if family == "all":
            if errors:
                raise _as_dns_error(errors[0])
            chosen = answers
        elif isinstance(preferred, BaseException):
            raise _as_dns_error(preferred)
        elif preferred.addresses:
            chosen = [preferred]  # the other question's answer, or failure, is not used
        elif isinstance(other, BaseException):
            raise _as_dns_error(other)
        else:
            chosen = [other]
        addresses: list[str] = []
        for ans in chosen:
            addresses += [a for a in ans.addresses if a not in addresses]
        ttls = [a.ttl for a in chosen if a.ttl is not None and (a.addresses or not addresses)]
        return Resolution(tuple(addresses), min(ttls) if ttls else None, "dns")

    async def query(self, name: str, qtype: int, conf: ResolvConf) -> wire.Answer:
        """One question, trying each nameserver ``attempts`` times."""
        last: BaseException = DnsError("no nameserver")
        for _ in range(conf.attempts):
            for server in conf.nameservers:
                qid = secrets.randbelow(0x10000)
                packet = wire.encode_query(qid, name, qtype)
                try:
                    data = await asyncio.wait_for(
                        _udp_exchange(server, self.port, packet, qid), conf.timeout
                    )
                    try:
                        ans = wire.parse_response(data, qid, name, qtype)
                    except DnsError:
                        if not wire.truncated_flag(data):
                            raise
                        # truncated in the middle of a record: TCP has it whole
                        ans = wire.Answer((), None, truncated=True)
                    if ans.truncated:
                        data = await asyncio.wait_for(
                            _tcp_exchange(server, self.port, packet), conf.timeout
                        )
                        ans = wire.parse_response(data, qid, name, qtype)
                    return ans
                except wire.DnsServerError as exc:
                    last = exc  # SERVFAIL/REFUSED: ask the next server
                except (TimeoutError, OSError, DnsError) as exc:
                    last = exc
        if isinstance(last, DnsError):
            raise last
        raise DnsError(_describe(last))


def _as_dns_error(exc: BaseException) -> DnsError:
    return exc if isinstance(exc, DnsError) else DnsError(_describe(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, qid: int, done: asyncio.Future[bytes]) -> None:
        self.qid = qid
        self.done = done

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # A reply with another id is stale or spoofed: ignore it, keep waiting.
        if len(data) >= 2 and int.from_bytes(data[:2], "big") == self.qid and not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)  # ICMP port unreachable: nobody serves DNS there


async def _udp_exchange(server: str, port: int, packet: bytes, qid: int) -> bytes:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    # A connected socket: the kernel drops datagrams from other sources.
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(qid, done), remote_addr=(server, port)
    )
    try:
        transport.sendto(packet)
        return await done
    finally:
        transport.close()


async def _tcp_exchange(server: str, port: int, packet: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(server, port)
    try:
        writer.write(len(packet).to_bytes(2, "big") + packet)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        # (an EOFError, which the callers did not take for a failed exchange:
        # it ended the whole lookup, the other question's answer with it)
        raise DnsError(f"TCP reply cut short: {len(exc.partial)} of {exc.expected} bytes") from None
    finally:
        writer.close()


# -- refresh state -------------------------------------------------------------


@dataclass
class NameState:
    """One name's addresses and the story of its lookups."""

    name: str
    addresses: tuple[str, ...] = ()
    resolved: bool = False  # has ever been answered; until then the name itself is the endpoint
    ttl: float | None = None
    source: str = ""
    next_at: float = 0.0  # monotonic time of the next lookup
    last_ok_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    lookups: int = 0
    failures: int = 0
    consecutive_failures: int = 0

    @property
    def stale(self) -> bool:
        """True while the latest lookup failed (the addresses are the last good ones)."""
        return self.last_error is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "addresses": list(self.addresses),
            "resolved": self.resolved,
            "ttl": self.ttl,
            "source": self.source,
            "refresh_in": round(max(0.0, self.next_at - time.monotonic()), 3),
            "last_ok_at": self.last_ok_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "lookups": self.lookups,
            "failures": self.failures,
        }


def _is_ip(address: str) -> bool:
    if ":" not in address and not address.replace(".", "").isdigit():
        # (a name: an IPv4 address is digits and dots, an IPv6 one has a
        # colon; no ipaddress parse, for each of a table's endpoints on the loop)
        return False
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def dns_names(table: RouteTable) -> dict[str, list[str]]:
    """Host-name endpoint addresses of DNS services → the service hosts using them.

    A name is kept with its trailing dot: ``a.b.`` is absolute, ``a.b`` may
    go through the search list, and they can be different names."""
    out: dict[str, list[str]] = {}
    for svc in table.services():
        if svc.resolution != "DNS":
            continue
        for ep in svc.endpoints:
            if not _is_ip(ep.address):
                hosts = out.setdefault(ep.address.lower(), [])
                if svc.host not in hosts:
                    hosts.append(svc.host)
    return out


def _resolved(ep: Endpoint, states: Mapping[str, NameState]) -> NameState | None:
    """The state of *ep*'s name where its addresses replace it."""
    st = states.get(ep.address.lower())
    if st is None or not st.resolved or _is_ip(ep.address):
        return None
    return st


def _address_cap(services: list[Service], states: Mapping[str, NameState], limit: int) -> int:
    """How many addresses of each name the table may take so that its
    endpoint entries (one a port, as the loader counts them: MAX_ENDPOINTS)
    stay within *limit*: 0 where every address fits, else the largest
    count that does (1 at least). A DNS answer may hold 4,000 addresses
    (a TCP reply's 64 KB), and each port of each service the name is an
    endpoint of takes a copy of each."""
    fixed = 0
    uses: dict[str, int] = {}  # name → its endpoint entries unexpanded
    for svc in services:
        for _, eps in svc.port_endpoints:
            for ep in eps:
                st = _resolved(ep, states)
                if st is None:
                    fixed += 1
                else:
                    key = ep.address.lower()
                    uses[key] = uses.get(key, 0) + 1
    sizes = {name: len(states[name].addresses) for name in uses}

    def entries(k: int) -> int:
        return fixed + sum(n * min(sizes[name], k) for name, n in uses.items())

    low, high = 1, max(sizes.values(), default=0)
    if entries(high) <= limit:
        return 0
    while low < high:  # the largest k in [1, high) whose entries fit (1 if none)
        mid = (low + high + 1) // 2
        if entries(mid) <= limit:
            low = mid
        else:
            high = mid - 1
    log.warning(
        "DNS answers would make %d endpoint entries (each port a copy of each address), "
        "more than the %d the rules may have: each name keeps %d of its addresses "
        "(the first in sorted order)",
        entries(max(sizes.values())),
        limit,
        low,
    )
    return low


def _expand(svc: Service, states: Mapping[str, NameState], cap: int = 0) -> Service:
    per_port = []
    for number, eps in svc.port_endpoints:
        seen: dict[Endpoint, None] = {}
        for ep in eps:
            st = _resolved(ep, states)
            if st is None:
                seen.setdefault(ep, None)
                continue
            for addr in sorted(st.addresses)[:cap] if cap else st.addresses:
                seen.setdefault(Endpoint(addr, ep.port, ep.labels), None)
        per_port.append((number, tuple(seen)))
    return Service(
        host=svc.host,
        ports=svc.ports,
        port_endpoints=tuple(per_port),
        addresses=svc.addresses,
        aliases=svc.aliases,
        resolution=svc.resolution,
    )


def answers_of(states: Mapping[str, NameState]) -> dict[str, NameState]:
    """What :func:`resolved_table` reads of *states* (each resolved name's
    addresses), copied: an expansion runs in a thread while the loop goes on
    recording answers in the states themselves. A name not resolved is left
    out (to resolved_table, the same as unresolved)."""
    return {
        name: NameState(name, st.addresses, resolved=True)
        for name, st in states.items()
        if st.resolved
    }


def resolved_table(
    base: RouteTable, states: Mapping[str, NameState], limit: int = MAX_ENDPOINTS
) -> RouteTable:
    """*base* with every resolved host-name endpoint replaced by its addresses.

    Routes, load-balancer policies (consistent hashes too), connection pool settings, outlier
    detection policies (their port-level ones too), ingress paths
    and the hosts that answer an unmatched request 404 are carried over as
    they are; only the services' endpoint lists change. (RouteTable has no public "copy with
    other services"; the private fields read here are its inputs.)
    """
    cap = _address_cap([svc for svc in base.services() if svc.resolution == "DNS"], states, limit)
    services = [
        _expand(svc, states, cap) if svc.resolution == "DNS" else svc for svc in base.services()
    ]
    return RouteTable(
        services,
        base._routes,
        load_balancers=base._load_balancers,
        hash_policies=base._hash_policies,
        pools=base._pools,
        outliers=base._outliers,
        port_policies=base._port_policies,
        ingress=base.ingress_paths,
        unmatched=base._unmatched,
        namespace=base.namespace,
        domain=base.domain,
        unserved_ports=base.unserved_ports,
    )


@dataclass
class DnsEndpoints:
    """The names a table needs, refreshed by TTL; see the module docstring."""

    resolver: Resolver = field(default_factory=Resolver)
    min_ttl: float = DEFAULT_MIN_TTL
    max_ttl: float = DEFAULT_MAX_TTL
    counters: Counters = field(default_factory=Counters)
    names: dict[str, NameState] = field(default_factory=dict)
    users: dict[str, list[str]] = field(default_factory=dict)  # name -> service hosts
    _warmed: bool = False
    _tracked_at: float = float("inf")  # monotonic: when the first name was tracked

    def __post_init__(self) -> None:
        self.max_ttl = max(self.max_ttl, self.min_ttl)
        c = self.counters
        c.describe(
            "l4proxy_dns_lookups_total",
            "counter",
            "DNS lookups of ServiceEntry endpoint names, by name and result.",
            labelled=True,
        )
        c.describe(
            "l4proxy_dns_addresses",
            "gauge",
            "Addresses a DNS endpoint name resolves to.",
            labelled=True,
        )
        c.describe(
            "l4proxy_dns_stale",
            "gauge",
            "1 while the last lookup of a name failed and its last good addresses are served.",
            labelled=True,
        )

    def track(self, table: RouteTable) -> bool:
        """Follow the names *table* uses (new ones are due now). True if any is new."""
        wanted = dns_names(table)
        new = False
        for name in wanted:
            if name not in self.names:
                self.names[name] = NameState(name)
                new = True
        if wanted and self._tracked_at == float("inf"):
            self._tracked_at = time.monotonic()
        for name in list(self.names):
            if name not in wanted:
                del self.names[name]
                self.counters.set("l4proxy_dns_addresses", 0, hostname=name)
                self.counters.set("l4proxy_dns_stale", 0, hostname=name)
        self.users = wanted
        return new

    def new_names(self, table: RouteTable) -> list[str]:
        """The names *table* uses that are not followed yet (a reload's new ones)."""
        return [name for name in dns_names(table) if name not in self.names]

    def first_lookup_bound(self) -> float:
        """How long a reload waits for its new names' first lookups: one
        query's timeout (resolv.conf's ``options timeout``, 5 s by default),
        at most WARM_WAIT. A live server answers a name's queries (those of
        its search list too) well within it; a silent one costs the reload
        that much, not the whole lookup's attempts x servers x timeout."""
        return min(self.resolver.conf.timeout, WARM_WAIT)

    async def first_lookups(
        self, names: list[str], within: float
    ) -> dict[str, tuple[Resolution | Exception, float]]:
        """Look up *names* (not followed yet), MAX_LOOKUPS at a time, for
        *within* seconds at most: the outcomes that came by then, by name (an
        answer, or the failure), each with the time.monotonic() it came at
        (its TTL, or its backoff, counts from then, not from the swap).
        Nothing is recorded here: when the table
        that uses them goes live, the caller tracks it (:meth:`track`), then
        records each outcome (:meth:`apply`). A lookup still under way at the
        end is cancelled, and its name, once tracked, is due at once, as a
        new name was before there was a first lookup (Envoy's cluster
        warming: a new cluster is used once its first resolution is done or
        has failed; here, or once the bound has passed)."""
        if not names:
            return {}
        slots = asyncio.Semaphore(MAX_LOOKUPS)

        async def lookup(name: str) -> Resolution:
            async with slots:
                return await self.resolver.resolve(name)

        def retrieved(task: asyncio.Future[Resolution]) -> None:
            # (a lookup that finishes after all, its cancel swallowed by a
            # wait_for, must not log "exception never retrieved")
            if not task.cancelled():
                task.exception()

        came: dict[asyncio.Future[Resolution], float] = {}

        def clock(task: asyncio.Future[Resolution]) -> None:
            came[task] = time.monotonic()

        tasks = {asyncio.ensure_future(lookup(name)): name for name in names}
        for task in tasks:
            task.add_done_callback(clock)
        try:
            await asyncio.wait(tasks, timeout=within)
        finally:
            for task in tasks:
                task.add_done_callback(retrieved)
                task.cancel()
        out: dict[str, tuple[Resolution | Exception, float]] = {}
        now = time.monotonic()
        for task, name in tasks.items():
            if not task.done() or task.cancelled():
                continue
            exc = task.exception()
            if exc is not None and not isinstance(exc, Exception):
                raise exc  # KeyboardInterrupt and the like
            out[name] = (exc or task.result(), came.get(task, now))
        return out

    def warmed(self) -> bool:
        """Whether every name has been looked up once (answered or failed),
        or WARM_WAIT seconds have passed since the first table named one.
        Sticky: names a later reload adds do not make it false again (the
        sidecar's readiness hangs on it, as Envoy's waits for its DNS
        clusters' first resolution, and must neither flap nor, with many
        names a silent server never answers, outlast a startup probe)."""
        if not self._warmed and (
            all(st.lookups for st in self.names.values()) or self.warm_wait_over()
        ):
            self._warmed = True
        return self._warmed

    def warm_wait_over(self) -> bool:
        """Whether WARM_WAIT seconds have passed since the first table named a name."""
        return time.monotonic() - self._tracked_at >= WARM_WAIT

    def next_due(self) -> float | None:
        return min((st.next_at for st in self.names.values()), default=None)

    def _clamp(self, ttl: float | None) -> float:
        if ttl is None:
            return self.min_ttl
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def apply(self, name: str, result: Resolution | BaseException, now: float) -> bool:
        """Record one lookup's outcome. True if the name's addresses changed."""
        st = self.names.get(name)
        if st is None:
            return False  # no longer used (a reload happened meanwhile)
        st.lookups += 1
        if isinstance(result, BaseException):
            st.failures += 1
            st.consecutive_failures += 1
            st.last_error = _describe(result)
            st.last_error_at = time.time()
            # (the exponent capped: 2 ** 1024 is past a float, and a name failing
            # for hours raised OverflowError here, which stopped every refresh)
            retry = self.min_ttl * 2 ** min(st.consecutive_failures - 1, 30)
            st.next_at = now + min(retry, max(self.min_ttl, MAX_RETRY))
            self.counters.inc("l4proxy_dns_lookups_total", hostname=name, result="error")
            self.counters.set("l4proxy_dns_stale", 1, hostname=name)
            log.warning(
                "DNS lookup of %s failed (%s); keeping %s",
                name,
                st.last_error,
                ", ".join(st.addresses) if st.resolved else "the name for connect-time lookup",
            )
            return False
        changed = not st.resolved or set(result.addresses) != set(st.addresses)
        if changed:
            log.info("DNS %s -> %s (ttl %s)", name, ", ".join(result.addresses) or "-", result.ttl)
        st.addresses = result.addresses
        st.resolved = True
        st.ttl = result.ttl
        st.source = result.source
        st.last_ok_at = time.time()
        st.last_error = None
        st.last_error_at = None
        st.consecutive_failures = 0
        st.next_at = now + self._clamp(result.ttl)
        outcome = "ok" if result.addresses else "empty"
        self.counters.inc("l4proxy_dns_lookups_total", hostname=name, result=outcome)
        self.counters.set("l4proxy_dns_addresses", len(result.addresses), hostname=name)
        self.counters.set("l4proxy_dns_stale", 0, hostname=name)
        return changed

    async def refresh_due(
        self,
        now: float | None = None,
        on_change: Callable[[], None] | None = None,
        wake: asyncio.Event | None = None,
    ) -> bool:
        """Look up every name whose time has come, MAX_LOOKUPS at a time.
        True if any changed.

        Each answer is applied as it comes, and *on_change* is called after
        each batch that changed something: one name timing out (up to
        attempts x servers x timeout, 30 s with the defaults) held back the
        answers of every other name due with it. *wake* set meanwhile (a
        reload tracked new names): the names due then are looked up at once,
        not after the slowest lookup under way.
        """
        now = time.monotonic() if now is None else now
        due = [name for name, st in self.names.items() if st.next_at <= now]
        if not due:
            return False
        slots = asyncio.Semaphore(MAX_LOOKUPS)

        async def lookup(name: str) -> Resolution:
            async with slots:
                return await self.resolver.resolve(name)

        tasks: dict[asyncio.Future[Resolution], str] = {}
        pending: set[asyncio.Future[Any]] = set()

        def start(names: list[str]) -> None:
            for name in names:
                task = asyncio.ensure_future(lookup(name))
                tasks[task] = name
                pending.add(task)

        start(due)
        waker: asyncio.Future[Any] | None = None
        changed_any = False
        try:
            while pending - {waker}:
                if wake is not None and waker is None:
                    waker = asyncio.ensure_future(wake.wait())
                    pending.add(waker)
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                pending.difference_update(done)
                at = time.monotonic()
                if waker is not None and waker in done:
                    assert wake is not None
                    wake.clear()
                    waker = None
                    # (a lookup done in this same wait is not applied yet: its
                    # name still looks due, and is not looked up again)
                    busy = {tasks[t] for t in pending | done if t in tasks}
                    start([n for n, st in self.names.items() if st.next_at <= at and n not in busy])
                changed = False
                for task in done:
                    if task not in tasks:
                        continue
                    exc = task.exception()
                    if exc is not None and not isinstance(exc, Exception):
                        raise exc  # KeyboardInterrupt and the like
                    changed |= self.apply(tasks[task], exc or task.result(), at)
                if changed:
                    changed_any = True
                    if on_change is not None:
                        on_change()
        finally:
            for task in tasks:
                task.cancel()
            if waker is not None:
                waker.cancel()
        return changed_any

    def for_service(self, host: str) -> list[dict[str, Any]]:
        """The DNS state of the names one service uses (for ``/clusters``)."""
        return [st.to_json() for name, st in self.names.items() if host in self.users.get(name, ())]

    def to_json(self) -> list[dict[str, Any]]:
        return [{**st.to_json(), "services": self.users.get(n, [])} for n, st in self.names.items()]


def ttl_bounds_from_env(environ: Mapping[str, str] | None = None) -> tuple[float, float]:
    """``L4PROXY_DNS_MIN_TTL`` / ``L4PROXY_DNS_MAX_TTL`` (seconds), else the defaults."""
    env = os.environ if environ is None else environ

    def get(key: str, default: float) -> float:
        try:
            value = float(env.get(key, ""))
        except ValueError:
            return default
        return value if value > 0 else default

    return get("L4PROXY_DNS_MIN_TTL", DEFAULT_MIN_TTL), get("L4PROXY_DNS_MAX_TTL", DEFAULT_MAX_TTL)

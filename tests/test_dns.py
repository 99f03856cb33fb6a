"""DNS endpoints: the wire codec, resolv.conf, the resolver against a real UDP/TCP
server on 127.0.0.1, TTL bounds, failures keeping the last good addresses, and
the rule watcher swapping re-resolved tables."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import socket
import struct
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4proxy.rules import _dnswire as wire
from l4proxy.rules.dns import (
    MAX_LOOKUPS,
    MAX_RETRY,
    DnsEndpoints,
    DnsError,
    Resolution,
    ResolvConf,
    Resolver,
    dns_names,
    read_hosts,
    resolved_table,
    ttl_bounds_from_env,
)
from l4proxy.rules.routing import Endpoint, Request, RouteTable, Service, ServicePort
from l4proxy.rules.watch import RuleWatcher
from tests._round_robin import rotation

# -- wire ----------------------------------------------------------------------


def _a(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def test_query_round_trip_with_cname_chain() -> None:
    q = wire.encode_query(0x1234, "bootcamp-v1.default.svc.cluster.local", wire.TYPE_A)
    assert q[:2] == b"\x12\x34" and q.endswith(struct.pack("!HHIH", 41, 1232, 0, 0))
    reply = wire.encode_response(
        q,
        [
            ("bootcamp-v1.default.svc.cluster.local", wire.TYPE_CNAME, 60, wire.encode_name("x.y")),
            ("x.y", wire.TYPE_A, 30, _a("198.18.0.11")),
            ("x.y", wire.TYPE_A, 10, _a("198.18.0.12")),
            ("other", wire.TYPE_A, 1, _a("198.18.0.99")),  # not on the chain: ignored
        ],
    )
    ans = wire.parse_response(reply, 0x1234, "Bootcamp-V1.default.svc.cluster.local.", wire.TYPE_A)
    assert ans.addresses == ("198.18.0.11", "198.18.0.12")
    assert ans.ttl == 10 and not ans.negative and not ans.truncated


def test_a_non_ascii_name_and_a_ttl_with_its_top_bit_set() -> None:
    """The reply's question (IDNA, as sent) was compared with the name as
    written, so a non-ASCII name never resolved; a TTL with the top bit set
    is 0 (RFC 2181 section 8), not that TTL less 2**31."""
    q = wire.encode_query(9, "bücher.test", wire.TYPE_A)
    record = ("xn--bcher-kva.test", wire.TYPE_A, 0x80000005, _a("198.18.0.9"))
    reply = wire.encode_response(q, [record])
    ans = wire.parse_response(reply, 9, "Bücher.test", wire.TYPE_A)
    assert ans.addresses == ("198.18.0.9",) and ans.ttl == 0


def test_aaaa_and_negative_answers() -> None:
    q = wire.encode_query(7, "v6.test", wire.TYPE_AAAA)
    ans = wire.parse_response(
        wire.encode_response(q, [("v6.test", wire.TYPE_AAAA, 5, _a("2001:2::11"))]),
        7,
        "v6.test",
        wire.TYPE_AAAA,
    )
    assert ans.addresses == ("2001:2::11",)
    soa = (
        wire.encode_name("ns.test") + wire.encode_name("h.test") + struct.pack("!5I", 1, 2, 3, 4, 9)
    )
    nx = wire.encode_response(
        q, [], rcode=wire.RCODE_NXDOMAIN, authority=[("test", wire.TYPE_SOA, 30, soa)]
    )
    ans = wire.parse_response(nx, 7, "v6.test", wire.TYPE_AAAA)
    assert ans.addresses == () and ans.negative and ans.ttl == 9
    nodata = wire.parse_response(wire.encode_response(q, []), 7, "v6.test", wire.TYPE_AAAA)
    assert nodata.negative and nodata.ttl is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[:5], "shorter than a header"),
        (lambda r: b"\x00\x09" + r[2:], "does not answer"),
        (lambda r: r[:2] + bytes([r[2], r[3] | 2]) + r[4:], "SERVFAIL"),
        (lambda r: r[:2] + bytes([r[2], r[3] | 5]) + r[4:], "REFUSED"),
        (lambda r: r[:-3], "truncated"),
    ],
)
def test_bad_replies_raise_dns_error(mutate: Callable[[bytes], bytes], message: str) -> None:
    q = wire.encode_query(8, "a.test", wire.TYPE_A)
    reply = wire.encode_response(q, [("a.test", wire.TYPE_A, 5, _a("198.18.0.1"))])
    with pytest.raises(DnsError, match=message):
        wire.parse_response(mutate(reply), 8, "a.test", wire.TYPE_A)


def test_reply_for_another_question_is_rejected() -> None:
    q = wire.encode_query(9, "b.test", wire.TYPE_A)
    with pytest.raises(DnsError, match=r"not a\.test"):
        wire.parse_response(wire.encode_response(q, []), 9, "a.test", wire.TYPE_A)


@given(st.binary(max_size=300))
def test_parse_garbage_is_dns_error_or_answer(data: bytes) -> None:
    try:
        wire.parse_response(data, int.from_bytes(data[:2] or b"\0\0", "big"), "a.b", wire.TYPE_A)
    except DnsError:
        pass


@given(st.binary(min_size=12, max_size=200))
def test_parse_garbage_after_a_valid_header(tail: bytes) -> None:
    q = wire.encode_query(3, "a.b", wire.TYPE_A)
    data = wire.encode_response(q, [("a.b", wire.TYPE_A, 5, _a("198.18.0.1"))])[:29] + tail
    try:
        wire.parse_response(data, 3, "a.b", wire.TYPE_A)
    except DnsError:
        pass


# -- resolv.conf, hosts, bounds --------------------------------------------------


def test_resolv_conf_like_a_kubernetes_pod() -> None:
    conf = ResolvConf.parse(
        textwrap.dedent(
            """\
            # generated by kubelet
            search default.svc.cluster.local svc.cluster.local cluster.local
            nameserver 10.96.0.10
            nameserver not-an-ip
            options ndots:5 timeout:2 attempts:3
            """
        )
    )
    assert conf.nameservers == ("10.96.0.10",)
    assert conf.search == ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert (conf.timeout, conf.attempts) == (2.0, 3)
    assert ResolvConf.parse("").nameservers == ("127.0.0.1",)
    assert (conf.ndots, ResolvConf.parse("").ndots) == (5, 1)
    r = Resolver(conf)
    # 4 dots < ndots 5: the search list first, as glibc (a trailing dot skips it)
    assert r.candidates("bootcamp-v1.default.svc.cluster.local", conf) == [
        "bootcamp-v1.default.svc.cluster.local.default.svc.cluster.local",
        "bootcamp-v1.default.svc.cluster.local.svc.cluster.local",
        "bootcamp-v1.default.svc.cluster.local.cluster.local",
        "bootcamp-v1.default.svc.cluster.local",
    ]
    assert r.candidates("bootcamp-v1.default.svc.cluster.local.", conf) == [
        "bootcamp-v1.default.svc.cluster.local"
    ]
    assert r.candidates("bootcamp-v1", conf)[0] == "bootcamp-v1.default.svc.cluster.local"


def test_resolv_conf_bounds_and_environment(tmp_path: Path) -> None:
    """ndots at most 15 and 6 search domains (glibc's bounds: each domain is a
    lookup per refresh); LOCALDOMAIN and RES_OPTIONS override the file, as
    for glibc's getaddrinfo at connect time."""
    many = " ".join(f"d{i}.test" for i in range(9))
    conf = ResolvConf.parse(f"search {many}\noptions ndots:99\n")
    assert conf.ndots == 15 and conf.search == tuple(f"d{i}.test" for i in range(6))
    path = tmp_path / "resolv.conf"
    path.write_text("search a.test\noptions ndots:5 timeout:2\n")
    assert ResolvConf.read(str(path), {}).search == ("a.test",)
    env = {"LOCALDOMAIN": "b.test c.test", "RES_OPTIONS": "ndots:2 attempts:4"}
    conf = ResolvConf.read(str(path), env)
    assert conf.search == ("b.test", "c.test")
    assert (conf.ndots, conf.timeout, conf.attempts) == (2, 2.0, 4)
    assert ResolvConf.read(str(tmp_path / "none"), {"RES_OPTIONS": "ndots:0"}).ndots == 0


def test_hosts_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n198.18.0.11 a.test A2.test. # c\nbad line\n")
    assert read_hosts(str(hosts)) == {
        "localhost": ["127.0.0.1"],
        "a.test": ["198.18.0.11"],
        "a2.test": ["198.18.0.11"],
    }
    r = Resolver(ResolvConf(), hosts_file=str(hosts))
    res = asyncio.run(r.resolve("A.test"))
    assert res == Resolution(("198.18.0.11",), None, "hosts")


def test_ttl_bounds_from_env() -> None:
    assert ttl_bounds_from_env({}) == (5.0, 300.0)
    env = {"L4PROXY_DNS_MIN_TTL": "1", "L4PROXY_DNS_MAX_TTL": "x"}
    assert ttl_bounds_from_env(env) == (1.0, 300.0)


# -- a real server on 127.0.0.1 ----------------------------------------------------

Zone = dict[tuple[str, int], list[str]]


def _udp_and_tcp_on_one_port() -> tuple[socket.socket, socket.socket, int]:
    """A UDP and a TCP socket bound to the same free port on 127.0.0.1.

    The TCP side is bound first, then UDP on its number, and the pair retried
    if that UDP port is taken: a port free for UDP can be in use by a TCP
    connection of a test running beside this one (it was, in CI).
    """
    for _ in range(50):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", port))
        except OSError:
            tcp.close()
            udp.close()
            continue
        tcp.listen(8)
        return udp, tcp, port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


class FakeDns:
    """UDP and TCP DNS on 127.0.0.1:<port> answering from ``zone``.

    ``truncate`` answers over UDP with TC set and no records (so the client must
    retry over TCP), ``truncate_types`` so for those types only; ``servfail``
    answers SERVFAIL; ``silent`` drops queries; ``cut_tcp`` > 0 sends that
    many bytes of a TCP reply (its length prefix included), then closes;
    ``delay`` > 0 sends each UDP reply that many seconds late (from a timer:
    the queries after it are not held up).
    """

    def __init__(self) -> None:
        self.zone: Zone = {}
        self.ttl = 30
        self.truncate = False
        self.truncate_types: set[int] = set()
        self.cut_tcp = 0
        self.servfail = False
        self.silent = False
        self.drop_types: set[int] = set()  # queries of these types are never answered
        self.cut_udp = 0  # > 0: UDP replies with TC set, cut to this many bytes
        self.delay = 0.0
        self.queries: list[tuple[str, str, int]] = []
        self.udp, self.tcp, self.port = _udp_and_tcp_on_one_port()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def answer(self, query: bytes, over: str) -> bytes | None:
        name, end = wire._read_name(query, 12)
        qtype = struct.unpack_from("!H", query, end)[0]
        self.queries.append((over, name, qtype))
        if self.silent or qtype in self.drop_types:
            return None
        if self.servfail:
            return wire.encode_response(query, [], rcode=wire.RCODE_SERVFAIL)
        if over == "udp" and (self.truncate or qtype in self.truncate_types):
            return wire.encode_response(query, [], truncated=True)
        addrs = self.zone.get((name, qtype))
        if addrs is None and not any(n == name for n, _ in self.zone):
            return wire.encode_response(query, [], rcode=wire.RCODE_NXDOMAIN)
        records = [(name, qtype, self.ttl, _a(a)) for a in addrs or []]
        if over == "udp" and self.cut_udp:
            whole = wire.encode_response(query, records, truncated=True)
            return whole[: self.cut_udp]
        return wire.encode_response(query, records)

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.2)
        while not self._stop:
            try:
                data, peer = self.udp.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self.answer(data, "udp")
            if reply is not None and self.delay > 0:
                late = threading.Timer(self.delay, self._send_late, (reply, peer))
                late.daemon = True
                late.start()
            elif reply is not None:
                self.udp.sendto(reply, peer)

    def _send_late(self, reply: bytes, peer: Any) -> None:
        with contextlib.suppress(OSError):  # (closed meanwhile)
            self.udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                size = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))[0]
                reply = self.answer(conn.recv(size, socket.MSG_WAITALL), "tcp")
                if reply is not None:
                    framed = struct.pack("!H", len(reply)) + reply
                    conn.sendall(framed[: self.cut_tcp] if self.cut_tcp else framed)

    def close(self) -> None:
        self._stop = True
        for t in self._threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def fake_dns() -> Iterator[FakeDns]:
    server = FakeDns()
    try:
        yield server
    finally:
        server.close()


def _resolver(
    server: FakeDns,
    tmp_path: Path,
    timeout: float = 0.3,
    family: str = "v4_preferred",
    conf: ResolvConf | None = None,
) -> Resolver:
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    conf = conf or ResolvConf(("127.0.0.1",), ("default.svc.cluster.local",), timeout, 1)
    return Resolver(
        conf, hosts_file=str(tmp_path / "hosts"), port=server.port, lookup_family=family
    )


def test_resolver_a_and_aaaa_by_lookup_family(fake_dns: FakeDns, tmp_path: Path) -> None:
    """As Envoy's dns_lookup_family. Both families' records in round robin
    put AAAA endpoints on IPv4-only pods (Istio gives those V4_ONLY)."""
    fake_dns.zone = {
        ("v1.test", wire.TYPE_A): ["198.18.0.11", "198.18.0.12"],
        ("v1.test", wire.TYPE_AAAA): ["2001:2::11"],
        ("v6.test", wire.TYPE_AAAA): ["2001:2::12"],
        ("v6.test", wire.TYPE_A): [],
    }

    def resolve(name: str, family: str) -> tuple[str, ...]:
        res = asyncio.run(_resolver(fake_dns, tmp_path, family=family).resolve(name))
        assert res.ttl == 30 and res.source == "dns"
        return res.addresses

    assert resolve("v1.test", "v4_preferred") == ("198.18.0.11", "198.18.0.12")
    assert resolve("v1.test", "v6_preferred") == ("2001:2::11",)
    assert set(resolve("v1.test", "all")) == {"198.18.0.11", "198.18.0.12", "2001:2::11"}
    assert resolve("v6.test", "v4_preferred") == ("2001:2::12",)  # no A: its AAAA
    # auto: by this host's routes
    assert Resolver(ResolvConf()).lookup_family in ("v4_preferred", "v6_preferred")


def test_an_nxdomain_to_one_type_does_not_wipe_the_others_addresses(
    fake_dns: FakeDns, tmp_path: Path
) -> None:
    """A server that says NXDOMAIN to AAAA while it answers A is wrong about
    one of them: the addresses win (Envoy's V4_PREFERRED asks AAAA only when
    A has none)."""

    class Inconsistent(FakeDns):
        def answer(self, query: bytes, over: str) -> bytes | None:
            _, end = wire._read_name(query, 12)
            if struct.unpack_from("!H", query, end)[0] == wire.TYPE_AAAA:
                return wire.encode_response(query, [], rcode=wire.RCODE_NXDOMAIN)
            return super().answer(query, over)

    server = Inconsistent()
    try:
        server.zone = {("v1.test", wire.TYPE_A): ["198.18.0.11"]}
        res = asyncio.run(_resolver(server, tmp_path).resolve("v1.test"))
    finally:
        server.close()
    assert res.addresses == ("198.18.0.11",)


def test_a_name_gone_is_gone_though_aaaa_is_never_answered(
    fake_dns: FakeDns, tmp_path: Path
) -> None:
    """NXDOMAIN for A (a headless Service scaled to zero) with the AAAA query
    timing out (a server that never answers AAAA) was a failed lookup: the
    pods' old addresses were kept, for ever. NXDOMAIN is for every type. A
    name that exists with no A record, its AAAA unanswered, is a failure."""
    fake_dns.zone = {("empty.test", wire.TYPE_A): []}  # exists, no A; gone.test: NXDOMAIN
    fake_dns.drop_types = {wire.TYPE_AAAA}
    res = asyncio.run(_resolver(fake_dns, tmp_path, timeout=0.2).resolve("gone.test"))
    assert res.addresses == () and res.source == "dns"
    with pytest.raises(DnsError, match="timeout"):
        asyncio.run(_resolver(fake_dns, tmp_path, timeout=0.2).resolve("empty.test"))
    fake_dns.zone[("v1.test", wire.TYPE_A)] = ["198.18.0.11"]
    res = asyncio.run(_resolver(fake_dns, tmp_path, timeout=0.2).resolve("v1.test"))
    assert res.addresses == ("198.18.0.11",)  # the A answer; the AAAA one not needed


def test_a_reply_cut_mid_record_is_asked_again_over_tcp(fake_dns: FakeDns, tmp_path: Path) -> None:
    many = [f"198.18.1.{i}" for i in range(1, 60)]
    fake_dns.zone = {("big.test", wire.TYPE_A): many, ("big.test", wire.TYPE_AAAA): []}
    fake_dns.cut_udp = 300  # TC set, the records cut in the middle of one
    res = asyncio.run(_resolver(fake_dns, tmp_path).resolve("big.test"))
    assert list(res.addresses) == many
    assert ("tcp", "big.test", wire.TYPE_A) in fake_dns.queries


def test_resolver_search_list_for_single_labels(fake_dns: FakeDns, tmp_path: Path) -> None:
    fake_dns.zone = {("bootcamp-v1.default.svc.cluster.local", wire.TYPE_A): ["198.18.0.11"]}
    res = asyncio.run(_resolver(fake_dns, tmp_path).resolve("bootcamp-v1"))
    assert res.addresses == ("198.18.0.11",)


K8S_SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")


def test_names_with_dots_go_through_the_search_list_as_glibc(
    fake_dns: FakeDns, tmp_path: Path
) -> None:
    """With a pod's ndots:5, a dotted name short of 5 dots was looked up only
    as written: ``bootcamp-v1.default`` got NXDOMAIN and its endpoints
    vanished, though the app's getaddrinfo finds it through the search list.
    glibc's order: fewer dots than ndots, the search list first; ndots or
    more, as written first; a trailing dot, as written only."""
    fake_dns.zone = {
        ("bootcamp-v1.default.svc.cluster.local", wire.TYPE_A): ["198.18.0.7"],
        ("v1.a.b.c.d.e.svc.cluster.local", wire.TYPE_A): ["198.18.0.8"],
        ("pods.a.b.c.d.e", wire.TYPE_A): ["198.18.0.9"],
    }
    conf = ResolvConf(("127.0.0.1",), K8S_SEARCH, 0.3, 1, ndots=5)
    r = _resolver(fake_dns, tmp_path, conf=conf)

    def asked(name: str) -> tuple[tuple[str, ...], list[str]]:
        fake_dns.queries.clear()
        addresses = asyncio.run(r.resolve(name)).addresses
        # (A and AAAA go out together; the names, in order, per type)
        return addresses, [n for over, n, t in fake_dns.queries if t == wire.TYPE_A]

    assert asked("bootcamp-v1.default") == (
        ("198.18.0.7",),
        ["bootcamp-v1.default.default.svc.cluster.local", "bootcamp-v1.default.svc.cluster.local"],
    )
    assert asked("bootcamp-v1.default.svc")[0] == ("198.18.0.7",)
    assert asked("bootcamp-v1")[0] == ("198.18.0.7",)
    assert asked("bootcamp-v1.default.svc.cluster.local")[1] == [
        *(f"bootcamp-v1.default.svc.cluster.local.{d}" for d in K8S_SEARCH),
        "bootcamp-v1.default.svc.cluster.local",
    ]
    # 5 dots: as written first, then the search list while NXDOMAIN
    assert asked("pods.a.b.c.d.e") == (("198.18.0.9",), ["pods.a.b.c.d.e"])
    assert asked("v1.a.b.c.d.e") == (
        ("198.18.0.8",),
        [
            "v1.a.b.c.d.e",
            "v1.a.b.c.d.e.default.svc.cluster.local",
            "v1.a.b.c.d.e.svc.cluster.local",
        ],
    )
    # a trailing dot: absolute, one name asked
    assert asked("bootcamp-v1.default.") == ((), ["bootcamp-v1.default"])
    assert asked("bootcamp-v1.default.svc.cluster.local.") == (
        ("198.18.0.7",),
        ["bootcamp-v1.default.svc.cluster.local"],
    )


def test_an_endpoint_name_keeps_its_trailing_dot() -> None:
    """``a.b.`` (absolute) and ``a.b`` (through the search list) can be
    different names: the tracked name kept no dot, so the trailing dot an
    endpoint was written with never reached the resolver."""
    svc = Service.create(
        "bootcamp.default.svc.cluster.local",
        [ServicePort(8080, "http", "HTTP")],
        [Endpoint("Bootcamp-V1.default.", 8080, {"version": "v1"})],
        resolution="DNS",
    )
    base = RouteTable([svc])
    assert dns_names(base) == {"bootcamp-v1.default.": [svc.host]}
    r = ScriptedResolver({"bootcamp-v1.default.": Resolution(("198.18.0.7",), 5, "dns")})
    dns = DnsEndpoints(r)
    dns.track(base)
    asyncio.run(dns.refresh_due())
    assert r.asked == ["bootcamp-v1.default."]
    assert [e.address for e in resolved_table(base, dns.names).services()[0].endpoints] == [
        "198.18.0.7"
    ]


def test_a_tcp_reply_cut_short_is_a_failed_try_not_a_crash(
    fake_dns: FakeDns, tmp_path: Path
) -> None:
    """A answered over UDP, AAAA truncated, and the TCP connection closed
    after one byte: asyncio's IncompleteReadError (an EOFError, not a
    DnsError) went through the lookup, so the A answer was thrown away and
    the other tries (servers, attempts) never made."""
    fake_dns.zone = {("svc.example.com", wire.TYPE_A): ["198.18.0.9"]}
    fake_dns.truncate_types = {wire.TYPE_AAAA}
    fake_dns.cut_tcp = 1
    conf = ResolvConf(("127.0.0.1", "127.0.0.1"), (), 0.3, 1)  # two servers (one here)
    res = asyncio.run(_resolver(fake_dns, tmp_path, conf=conf).resolve("svc.example.com"))
    assert res.addresses == ("198.18.0.9",)
    tcp = [q for q in fake_dns.queries if q[0] == "tcp"]
    assert tcp == [("tcp", "svc.example.com", wire.TYPE_AAAA)] * 2  # the next server asked
    # preferred family failing so: a DnsError (the last good addresses stay)
    with pytest.raises(DnsError, match="cut short"):
        asyncio.run(
            _resolver(fake_dns, tmp_path, family="v6_preferred", conf=conf).resolve(
                "svc.example.com"
            )
        )


def test_resolver_truncated_udp_retries_over_tcp(fake_dns: FakeDns, tmp_path: Path) -> None:
    many = [f"198.18.1.{i}" for i in range(1, 120)]  # more than 1232 bytes of records
    fake_dns.zone = {("big.test", wire.TYPE_A): many, ("big.test", wire.TYPE_AAAA): []}
    fake_dns.truncate = True
    res = asyncio.run(_resolver(fake_dns, tmp_path).resolve("big.test"))
    assert list(res.addresses) == many
    assert ("tcp", "big.test", wire.TYPE_A) in fake_dns.queries


@pytest.mark.parametrize("failure", ["servfail", "silent"])
def test_resolver_failures(fake_dns: FakeDns, tmp_path: Path, failure: str) -> None:
    setattr(fake_dns, failure, True)
    with pytest.raises(DnsError, match="SERVFAIL" if failure == "servfail" else "timeout"):
        asyncio.run(_resolver(fake_dns, tmp_path, timeout=0.2).resolve("v1.test"))


def test_resolver_nobody_listening(tmp_path: Path) -> None:
    # ICMP port unreachable on loopback: a quick failure, not a timeout.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = Resolver(ResolvConf(("127.0.0.1",), (), 2.0, 1), hosts_file=str(tmp_path / "x"), port=port)
    with pytest.raises(DnsError):
        asyncio.run(asyncio.wait_for(r.resolve("v1.test"), 1.5))


# -- refresh state and the expanded table ------------------------------------------

NAMES = ("bootcamp-v1.default.svc.cluster.local", "bootcamp-v2.default.svc.cluster.local")


def _dns_table() -> RouteTable:
    eps = [
        Endpoint(NAMES[0], 8080, {"app": "bootcamp", "version": "v1"}),
        Endpoint(NAMES[1], 8080, {"app": "bootcamp", "version": "v2"}),
    ]
    svc = Service.create(
        "bootcamp.default.svc.cluster.local",
        [ServicePort(8080, "http", "HTTP")],
        eps,
        addresses=["198.19.0.10"],
        resolution="DNS",
    )
    return RouteTable([svc])


class ScriptedResolver(Resolver):
    """Answers from a dict; a value that is an exception is raised."""

    def __init__(self, answers: dict[str, Resolution | Exception]) -> None:
        super().__init__(ResolvConf())
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(self, name: str) -> Resolution:
        self.asked.append(name)
        ans = self.answers[name]
        if isinstance(ans, Exception):
            raise ans
        return ans


def test_resolved_table_is_one_endpoint_per_address() -> None:
    base = _dns_table()
    assert sorted(dns_names(base)) == sorted(NAMES)
    r = ScriptedResolver(
        {
            NAMES[0]: Resolution(("198.18.0.11", "198.18.0.12"), 5, "dns"),
            NAMES[1]: Resolution(("198.18.0.13",), 5, "dns"),
        }
    )
    dns = DnsEndpoints(r)
    assert dns.track(base)
    assert asyncio.run(dns.refresh_due())
    table = resolved_table(base, dns.names)
    svc = table.service("bootcamp.default.svc.cluster.local")
    assert svc is not None
    assert [(e.address, e.labels["version"]) for e in svc.endpoints] == [
        ("198.18.0.11", "v1"),
        ("198.18.0.12", "v1"),
        ("198.18.0.13", "v2"),
    ]
    # Round robin with no rule is per pod address: 2 of 3 to v1 (from
    # wherever its drawn offset starts it).
    picks = [table.decide(svc, 8080, Request()).endpoints[0].address for _ in range(6)]
    rotation(picks, ["198.18.0.11", "198.18.0.12", "198.18.0.13"])
    assert base.service(svc.host) is not None  # the base keeps the names
    assert table.to_json()["routes"] == base.to_json()["routes"]


def test_unresolved_names_stay_names_and_failures_keep_last_good() -> None:
    base = _dns_table()
    answers: dict[str, Resolution | Exception] = {
        NAMES[0]: Resolution(("198.18.0.11",), 1, "dns"),
        NAMES[1]: DnsError("timeout"),
    }
    dns = DnsEndpoints(ScriptedResolver(answers), min_ttl=2, max_ttl=10)
    dns.track(base)
    asyncio.run(dns.refresh_due(now=0))
    svc = resolved_table(base, dns.names).services()[0]
    assert [e.address for e in svc.endpoints] == ["198.18.0.11", NAMES[1]]
    v2 = dns.names[NAMES[1]]
    assert v2.stale and v2.last_error == "timeout" and not v2.resolved
    assert dns.counters.get("l4proxy_dns_stale", hostname=NAMES[1]) == 1

    # v1 fails now: its last good address stays, and it is reported.
    answers[NAMES[0]] = DnsError("SERVFAIL")
    changed = dns.apply(NAMES[0], DnsError("SERVFAIL"), now=100)
    assert not changed
    assert dns.names[NAMES[0]].addresses == ("198.18.0.11",)
    assert dns.names[NAMES[0]].stale
    assert dns.counters.get("l4proxy_dns_lookups_total", hostname=NAMES[0], result="error") == 1
    assert dns.counters.get("l4proxy_dns_lookups_total", hostname=NAMES[0], result="ok") == 1
    # Backoff: min TTL, doubling, capped.
    dns.apply(NAMES[0], DnsError("SERVFAIL"), now=100)
    assert dns.names[NAMES[0]].next_at == 104
    # A negative answer is an answer: the pods are gone.
    assert dns.apply(NAMES[0], Resolution((), None, "dns"), now=200)
    svc = resolved_table(base, dns.names).services()[0]
    assert NAMES[0] not in [e.address for e in svc.endpoints]
    assert not any(e.labels["version"] == "v1" for e in svc.endpoints)


def test_a_name_failing_for_hours_keeps_its_retry_and_the_other_names_refreshing() -> None:
    """The backoff's exponent grew with every failure: at the 1025th (about
    8.5 hours of retries 30 s apart) 2 ** 1024 overflowed a float, and the
    OverflowError ended every refresh round, so no other name's change
    reached the table again."""
    dns = DnsEndpoints(ScriptedResolver({}), min_ttl=2.0, max_ttl=60.0)  # floats, as parsed
    dns.track(_dns_table())
    for i in range(2000):
        dns.apply(NAMES[1], DnsError("SERVFAIL"), now=i)
    assert dns.names[NAMES[1]].next_at == 1999 + MAX_RETRY
    assert dns.apply(NAMES[0], Resolution(("198.18.0.11",), 5, "dns"), now=2000)


@pytest.mark.parametrize(("ttl", "expect"), [(0, 2.0), (7, 7.0), (10_000, 60.0), (None, 2.0)])
def test_ttl_floor_and_ceiling(ttl: float | None, expect: float) -> None:
    dns = DnsEndpoints(ScriptedResolver({}), min_ttl=2, max_ttl=60)
    dns.track(_dns_table())
    dns.apply(NAMES[0], Resolution(("198.18.0.11",), ttl, "dns"), now=1000)
    assert dns.names[NAMES[0]].next_at == 1000 + expect


# -- the rule watcher ------------------------------------------------------------

RULES = """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: bootcamp}
spec:
  hosts: [bootcamp.default.svc.cluster.local]
  addresses: [198.19.0.10]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: DNS
  endpoints:
  - address: bootcamp-v1.default.svc.cluster.local
    labels: {app: bootcamp, version: v1}
  - address: bootcamp-v2.default.svc.cluster.local
    labels: {app: bootcamp, version: v2}
"""


def _addresses(w: RuleWatcher) -> list[str]:
    return sorted(e.address for e in w.state.table.services()[0].endpoints)


def test_rule_watcher_swaps_on_dns_change_and_keeps_generation(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    answers: dict[str, Resolution | Exception] = {
        NAMES[0]: Resolution(("198.18.0.11",), 0, "dns"),
        NAMES[1]: Resolution(("198.18.0.13",), 0, "dns"),
    }
    swaps: list[int] = []

    async def main() -> None:
        w = RuleWatcher(
            [str(tmp_path)],
            interval=0.05,
            resolver=ScriptedResolver(answers),
            dns_min_ttl=0.05,
            dns_max_ttl=1,
            on_swap=lambda s: swaps.append(s.generation),
        )
        assert w.load_now()
        assert _addresses(w) == sorted(NAMES)  # names until the first answer
        w.start()
        try:
            for _ in range(100):
                await asyncio.sleep(0.02)
                if _addresses(w) == ["198.18.0.11", "198.18.0.13"]:
                    break
            assert _addresses(w) == ["198.18.0.11", "198.18.0.13"]
            answers[NAMES[1]] = Resolution(("198.18.0.14", "198.18.0.15"), 0, "dns")
            answers[NAMES[0]] = DnsError("timeout")
            for _ in range(100):
                await asyncio.sleep(0.02)
                if "198.18.0.15" in _addresses(w):
                    break
            assert _addresses(w) == ["198.18.0.11", "198.18.0.14", "198.18.0.15"]
            assert w.state.generation == 1 and w.state.dns_updates >= 2
            dump = w.state.to_json()
            v1 = next(d for d in dump["dns"] if d["name"] == NAMES[0])
            assert v1["last_error"] == "timeout" and v1["addresses"] == ["198.18.0.11"]
            # A reload re-expands with the addresses known: never back to names.
            (tmp_path / "rules.yaml").write_text(RULES + "\n")
            w.request_reload()
            for _ in range(50):
                await asyncio.sleep(0.02)
                if w.state.generation == 2:
                    break
            assert w.state.generation == 2
            assert NAMES[1] not in _addresses(w)
        finally:
            await w.stop()

    asyncio.run(main())
    assert swaps[0] == 1 and len(swaps) >= 3


class SlowResolver(Resolver):
    """Each name answers after its delay; counts lookups under way at once."""

    def __init__(self, delays: dict[str, float]) -> None:
        super().__init__(ResolvConf())
        self.delays = delays
        self.running = self.most = 0

    async def resolve(self, name: str) -> Resolution:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delays[name])
            return Resolution(("198.18.0.11",), 5, "dns")
        finally:
            self.running -= 1


def test_a_slow_name_does_not_hold_the_others_answers() -> None:
    """Names due together were applied together: one timing out (30 s with
    the defaults) held back a 5 s name's change as long. Each batch of
    answers is applied, and published, as it comes."""
    slow = SlowResolver({NAMES[0]: 0.0, NAMES[1]: 0.5})
    dns = DnsEndpoints(slow, min_ttl=2, max_ttl=10)
    dns.track(_dns_table())
    published: list[tuple[bool, bool]] = []

    def on_change() -> None:
        published.append((dns.names[NAMES[0]].resolved, dns.names[NAMES[1]].resolved))

    assert asyncio.run(dns.refresh_due(now=0, on_change=on_change))
    assert published == [(True, False), (True, True)]


def test_a_name_a_reload_adds_is_looked_up_at_once_not_after_the_slow_ones() -> None:
    """A reload's new name waited for the end of the round under way: behind
    a name timing out, up to 30 s, during which its service's subsets were
    the unresolved name (503 in request mode)."""
    new = "bootcamp-v3.default.svc.cluster.local"
    slow = SlowResolver({NAMES[0]: 0.0, NAMES[1]: 3.0, new: 0.0})
    dns = DnsEndpoints(slow, min_ttl=2, max_ttl=10)
    dns.track(_dns_table())
    published: list[tuple[float, bool]] = []

    async def main() -> None:
        wake = asyncio.Event()
        started = time.monotonic()

        def on_change() -> None:
            st = dns.names.get(new)
            published.append((time.monotonic() - started, bool(st and st.resolved)))

        round_ = asyncio.ensure_future(dns.refresh_due(on_change=on_change, wake=wake))
        await asyncio.sleep(0.2)  # NAMES[1] is under way for 3 s
        base = _dns_table()
        (svc,) = base.services()
        more = Service.create(
            svc.host, svc.ports, [*svc.endpoints, Endpoint(new, 8080, {"version": "v3"})],
            addresses=["198.19.0.10"], resolution="DNS",
        )  # fmt: skip
        assert dns.track(RouteTable([more]))
        wake.set()  # what the watcher does when a reload tracks new names
        await round_

    asyncio.run(main())
    when = next(t for t, resolved in published if resolved)
    assert when < 1.0, published  # was: after NAMES[1]'s 3 s
    assert published[-1][0] >= 3.0  # ... which still came, in the same round


def test_lookups_at_once_are_bounded() -> None:
    names = [f"svc{i}.example.com" for i in range(40)]
    eps = [Endpoint(n, 443, {}) for n in names]
    svc = Service.create("ext.example.com", [ServicePort(443, "tls", "TLS")], eps, resolution="DNS")
    slow = SlowResolver(dict.fromkeys(names, 0.01))
    dns = DnsEndpoints(slow)
    dns.track(RouteTable([svc]))
    assert asyncio.run(dns.refresh_due(now=0))
    assert all(dns.names[n].resolved for n in names)
    assert slow.most == MAX_LOOKUPS


def test_the_sidecar_is_ready_once_every_name_had_its_first_lookup(tmp_path: Path) -> None:
    """Until its first answer a name is no address, and the per-request relay
    answers its services 503: /ready said LIVE already, so the app's first
    requests could meet those. Ready waits for every name's first lookup
    (answered or failed), once: names a reload adds later do not flap it (a
    reload waits for their first lookups, but not for ever: one still under
    way at the bound, here 0.05 s, goes live unresolved)."""
    from l4proxy.dataplane.listener import bind_listener
    from l4proxy.sidecar.admin import WorkerView
    from l4proxy.sidecar.worker import Worker, WorkerOptions

    (tmp_path / "rules.yaml").write_text(RULES)
    slow = SlowResolver(dict.fromkeys(NAMES, 0.0))
    seen: list[bool] = []

    async def main() -> None:
        w = RuleWatcher([str(tmp_path)], resolver=slow, dns_warm_timeout=0.05)
        assert w.load_now()
        lst = bind_listener("127.0.0.1", 0, "gateway")
        worker = Worker([lst], w, WorkerOptions())
        view = WorkerView(worker, "test")
        try:
            seen.append(await view.ready())
            await w.refresh_dns()
            seen.append(await view.ready())
            third = "bootcamp-v3.default.svc.cluster.local"
            slow.delays[third] = 1.0
            extra = RULES + "  - address: " + third + "\n    labels: {version: v3}\n"
            (tmp_path / "rules.yaml").write_text(extra)
            assert await w.reload()
            assert third in w.dns.names and not w.dns.names[third].lookups
            seen.append(await view.ready())
        finally:
            worker.close()
            lst.sock.close()

    asyncio.run(main())
    assert seen == [False, True, True]


def test_readiness_waits_for_dns_no_longer_than_warm_wait() -> None:
    """Dozens of names a silent server never answers (10 s each, 8 at a time)
    held /ready past a startup probe's minute: the kubelet restarted the
    sidecar, which started over, and the pod never started."""
    import l4proxy.rules.dns as dns_module

    dns = DnsEndpoints(ScriptedResolver({}))
    assert dns.warmed()  # no names: nothing to wait for
    dns = DnsEndpoints(ScriptedResolver({}))
    dns.track(_dns_table())
    assert not dns.warmed()
    dns._tracked_at -= dns_module.WARM_WAIT
    assert dns.warmed()


# -- a reload's new names: looked up before the table goes live ---------------------


def _gateway_rules(rows: str, resolution: str = "STATIC") -> str:
    """tests._worker's gateway to svc, its endpoints *rows*, resolved so."""
    from tests._worker import GATEWAY_SERVICE

    return GATEWAY_SERVICE.replace("resolution: STATIC", f"resolution: {resolution}") % rows


def _row(address: str, port: int) -> str:
    return f"  - {{address: {address}, ports: {{http: {port}}}}}"


def _status_and_body(address: tuple[str, int]) -> str:
    """One request on a connection of its own: "200 v1", "503 no healthy upstream"."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if b" " in head else "closed"
    return f"{status} {body.decode(errors='replace').strip()}"


class Hammer:
    """A client in a thread sending requests one after the other until
    stopped, counting the answers (status and body)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.seen: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen[_status_and_body(self.address)] += 1
            except OSError as exc:
                self.seen[f"error {exc}"] += 1

    async def until(self, answer: str, count: int) -> None:
        for _ in range(500):
            if self.seen[answer] >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"not {count} x {answer!r} in 10 s: {self.seen}")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)


def test_a_name_a_reload_adds_answers_at_once_no_503_window(
    fake_dns: FakeDns, tmp_path: Path
) -> None:
    """A reload that makes a service's endpoint a DNS name went live at once,
    the name not looked up yet: per request, its requests were answered
    ``503 no healthy upstream`` until the lookup landed (here 0.5 s; with a
    slow server, seconds). As Envoy warms a new cluster, the old table now
    serves until the new names have had their first lookup: a client sending
    requests all through the reload gets v1, then v2, and never a 503."""
    from tests._worker import gateway_service, gateway_worker
    from tests.conftest import serving

    fake_dns.zone[("v2.test", wire.TYPE_A)] = ["127.0.0.1"]
    fake_dns.delay = 0.5
    resolver = _resolver(fake_dns, tmp_path, timeout=2.0)
    rules = tmp_path / "rules.yaml"
    with serving(lambda _: b"v1") as v1, serving(lambda _: b"v2") as v2:
        rules.write_text(gateway_service(int(v1.rsplit(":", 1)[1])))
        dns_rules = _gateway_rules(_row("v2.test.", int(v2.rsplit(":", 1)[1])), "DNS")
        seen: Counter[str] = Counter()

        async def main() -> None:
            opts = {"resolver": resolver, "seed": 7}
            async with gateway_worker(rules, True, opts, http_routing="request") as (
                watcher,
                _,
                address,
            ):
                hammer = Hammer(address)
                try:
                    await hammer.until("200 v1", 5)
                    rules.write_text(dns_rules)
                    assert await watcher.reload()
                    await hammer.until("200 v2", 20)
                finally:
                    await hammer.stop()
                    seen.update(hammer.seen)

        asyncio.run(main())
    assert ("udp", "v2.test", wire.TYPE_A) in fake_dns.queries
    assert set(seen) == {"200 v1", "200 v2"}, seen  # was: hundreds of 503s between


def test_a_silent_dns_server_holds_a_reload_no_longer_than_one_query_timeout(
    fake_dns: FakeDns, tmp_path: Path
) -> None:
    """The warm-up of a reload's new names is bounded by the resolver's
    per-query timeout (0.5 s here; the whole lookup, 5 attempts x 2 servers,
    would be 5 s): a DNS server that never answers delays the reload by that
    much, and the table goes live as it did before, the name unresolved and
    due for the background lookup at once."""
    fake_dns.silent = True
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    conf = ResolvConf(("127.0.0.1", "127.0.0.1"), (), 0.5, 5)
    resolver = Resolver(
        conf, hosts_file=str(tmp_path / "hosts"), port=fake_dns.port, lookup_family="v4_preferred"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(_gateway_rules(_row("127.0.0.1", 8080)))
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0, resolver=resolver)
    assert watcher.load_now()
    rules.write_text(_gateway_rules(_row("v2.test.", 8080), "DNS"))

    async def main() -> None:
        async with asyncio.timeout(3):  # not the lookup's 5 s
            assert await watcher.reload()

    asyncio.run(main())
    assert watcher.state.generation == 2
    assert [e.address for e in watcher.state.table.services()[0].endpoints] == ["v2.test."]
    st = watcher.dns.names["v2.test."]
    assert not st.resolved and st.lookups == 0 and st.next_at <= time.monotonic()
    assert ("udp", "v2.test", wire.TYPE_A) in fake_dns.queries  # it was asked


def test_changes_during_a_warm_up_are_loaded_after_it_in_order(
    fake_dns: FakeDns, tmp_path: Path
) -> None:
    """While a reload waits for its new names, the old table serves and the
    watch is not polling: a file written, or a SIGHUP, meanwhile is loaded
    right after, never lost, never before the table it follows."""
    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.1"]
    fake_dns.zone[("c.test", wire.TYPE_A)] = ["127.0.0.3"]
    fake_dns.delay = 0.4
    rules = tmp_path / "rules.yaml"
    rules.write_text(_gateway_rules(_row("127.0.0.9", 9)))
    published: list[tuple[int, list[str]]] = []

    def write(text: str) -> None:  # whole, as a writer should (the watch polls)
        (tmp_path / ".rules.tmp").write_text(text)
        (tmp_path / ".rules.tmp").replace(rules)

    def on_swap(st: Any) -> None:
        eps = st.table.services()[0].endpoints
        published.append((st.generation, [f"{e.address}:{e.port}" for e in eps]))

    async def asked(name: str) -> None:
        for _ in range(250):
            if any(q[1] == name for q in fake_dns.queries):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{name} never asked")

    async def until(generation: int) -> None:
        for _ in range(250):
            if published and published[-1][0] >= generation:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"generation {generation} never published: {published}")

    async def main() -> None:
        w = RuleWatcher(
            [str(rules)],
            interval=0.02,
            settle=0,
            resolver=_resolver(fake_dns, tmp_path, timeout=2.0),
            on_swap=on_swap,
        )
        assert w.load_now()
        w.start()
        try:
            write(_gateway_rules(_row("a.test.", 1), "DNS"))
            await asked("a.test")  # its warm-up is under way: a change now
            write(_gateway_rules(_row("127.0.0.2", 2)))
            await until(3)
            write(_gateway_rules(_row("c.test.", 3), "DNS"))
            await asked("c.test")  # and a SIGHUP during this one's
            w.request_reload()
            await until(5)
            await asyncio.sleep(0.2)  # nothing more comes
        finally:
            await w.stop()

    asyncio.run(main())
    assert published == [
        (1, ["127.0.0.9:9"]),
        (2, ["127.0.0.1:1"]),  # was: a.test.:1 first, the address a DNS update later
        (3, ["127.0.0.2:2"]),
        (4, ["127.0.0.3:3"]),
        (5, ["127.0.0.3:3"]),
    ]


# -- review: failures around a reload's warm-up ------------------------------------


class _ConfBroken(Resolver):
    """A resolver whose resolv.conf cannot be read as it should (a bug of
    ours): every lookup fails, as the DNS task records it; ``conf`` raises."""

    @property
    def conf(self) -> ResolvConf:
        raise RuntimeError("resolv.conf: a bug")


def test_a_resolver_bug_in_the_warm_up_bound_does_not_lose_the_reload(tmp_path: Path) -> None:
    """_first_lookups contains a resolver bug ("the names are looked up after
    the swap"), but the bound (first_lookup_bound: resolv.conf's timeout) was
    read outside that guard: the error left reload(), _run took the files as
    loaded, and valid rules never went live (no last_error either) until the
    next change. Before the warm-up, the table went live and the names'
    lookups failed, shown in /clusters."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(_gateway_rules(_row("127.0.0.1", 8080)))
    watcher = RuleWatcher([str(rules)], interval=3600, settle=0, resolver=_ConfBroken())
    assert watcher.load_now()
    rules.write_text(_gateway_rules(_row("v2.test.", 8080), "DNS"))

    async def main() -> bool:
        return await watcher.reload()

    assert asyncio.run(main())  # was: RuntimeError out of reload()
    assert watcher.state.generation == 2 and watcher.state.last_error is None
    assert [e.address for e in watcher.state.table.services()[0].endpoints] == ["v2.test."]


def test_a_resolver_bug_in_a_late_loads_warm_up_does_not_wedge_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load past its deadline that ends after all goes live from
    ended_late, which now awaits the warm-up between its check and the swap;
    an error there ended that task with ``stuck`` still set, and every later
    reload returned False at once: the rules were never reloaded again."""
    from l4proxy.rules import watch as rulewatch

    rules = tmp_path / "rules.yaml"
    rules.write_text(_gateway_rules(_row("127.0.0.1", 8080)))
    watcher = RuleWatcher(
        [str(rules)], interval=3600, settle=0, resolver=_ConfBroken(), load_deadline=0.1
    )
    assert watcher.load_now()
    real = rulewatch.load_rules

    def slow(*args: Any, **kw: Any) -> Any:
        time.sleep(0.4)
        return real(*args, **kw)

    monkeypatch.setattr(rulewatch, "load_rules", slow)
    rules.write_text(_gateway_rules(_row("v2.test.", 8080), "DNS"))

    async def main() -> None:
        assert not await watcher.reload()  # past its deadline: reported
        assert watcher.stuck is not None
        for _ in range(100):  # the load ends at 0.4 s; ended_late swaps it in
            if watcher.stuck is None:
                break
            await asyncio.sleep(0.02)
        assert watcher.stuck is None, "stuck for ever: no reload starts again"

    asyncio.run(main())
    assert watcher.state.generation == 2


def test_a_first_lookups_ttl_counts_from_its_answer_not_from_the_swap(tmp_path: Path) -> None:
    """Every first outcome was recorded with the swap's time: a name answered
    at once, with another name holding the warm-up to its bound, was cached
    for its TTL *plus* the bound (10 s at most), and its failure backoff so
    too. Its refresh is due TTL after its answer, as for the DNS task's."""
    answered: dict[str, float] = {}

    class Clocked(Resolver):
        async def resolve(self, name: str) -> Resolution:
            if name.startswith("slow"):
                await asyncio.sleep(30)
            answered[name] = time.monotonic()
            return Resolution(("127.0.0.1",), 1.0, "dns")

    rules = tmp_path / "rules.yaml"
    rules.write_text(_gateway_rules(_row("127.0.0.1", 8080)))
    watcher = RuleWatcher(
        [str(rules)],
        interval=3600,
        settle=0,
        resolver=Clocked(ResolvConf()),
        dns_min_ttl=1.0,
        dns_warm_timeout=0.6,
    )
    assert watcher.load_now()
    rows = "\n".join([_row("fast.test.", 8080), _row("slow.test.", 8080)])
    rules.write_text(_gateway_rules(rows, "DNS"))

    async def main() -> None:
        assert await watcher.reload()

    asyncio.run(main())
    st = watcher.dns.names["fast.test."]
    assert st.resolved and st.lookups == 1
    late = st.next_at - (answered["fast.test."] + 1.0)
    assert late < 0.3, f"refresh due {late:.2f} s past the answer's TTL (the warm-up's bound)"


def test_resolv_conf_options_with_a_non_ascii_digit_are_ignored() -> None:
    """``str.isdigit`` is true of "²", which int() refuses: parse() raised
    ValueError, and every lookup (and, with a reload's warm-up, the reload)
    failed with it. Such an option is ignored, as glibc ignores what it
    cannot read."""
    conf = ResolvConf.parse(
        "nameserver 10.0.0.10\noptions timeout:\u00b2 attempts:3 ndots:\u00b9\n"
    )
    assert (conf.timeout, conf.attempts, conf.ndots) == (5.0, 3, 1)


# -- a DNS change's re-expansion: off the event loop ----------------------------------


class GatedExpansion:
    """resolved_table as the watcher calls it (patched in), watched: each
    call counted with the thread it ran in; ``hold`` (a threading.Event),
    where set, is waited on by the next call, in its thread, before it
    expands (``entered`` says it is there); ``working`` is true while the
    real expansion runs. A call on the event loop's thread that would wait
    raises: held there, it would stop the very loop the test watches."""

    def __init__(self, real: Callable[..., RouteTable]) -> None:
        self.real = real
        self.hold: threading.Event | None = None
        self.entered = threading.Event()
        self.threads: list[str] = []
        self.done = 0
        self.working = False

    def __call__(self, base: RouteTable, states: Any) -> RouteTable:
        me = threading.current_thread()
        self.threads.append(me.name)
        hold, self.hold = self.hold, None
        if hold is not None:
            if me is threading.main_thread():
                raise AssertionError("a DNS change expanded on the event loop's thread")
            self.entered.set()
            assert hold.wait(10), "never released"
        self.working = True
        try:
            return self.real(base, states)
        finally:
            self.working = False
            self.done += 1


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> GatedExpansion:
    from l4proxy.rules import watch as rulewatch

    gate = GatedExpansion(rulewatch.resolved_table)
    monkeypatch.setattr(rulewatch, "resolved_table", gate)
    return gate


async def _until(what: Callable[[], bool], why: str) -> None:
    for _ in range(500):
        if what():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {why} within 10 s")


def _big_rules(services: int, ports: int) -> str:
    """*services* ServiceEntries of *ports* ports each, resolution DNS, each
    with two endpoint names (svc<i>-a.test., svc<i>-b.test.)."""
    docs = []
    port_list = ", ".join(
        f"{{number: {8000 + p}, name: http-{p}, protocol: HTTP}}" for p in range(ports)
    )
    for i in range(services):
        docs.append(
            textwrap.dedent(
                f"""\
                apiVersion: networking.istio.io/v1alpha3
                kind: ServiceEntry
                metadata: {{name: svc{i}}}
                spec:
                  hosts: [svc{i}.test]
                  ports: [{port_list}]
                  resolution: DNS
                  endpoints:
                  - {{address: svc{i}-a.test., labels: {{version: v1}}}}
                  - {{address: svc{i}-b.test., labels: {{version: v2}}}}
                """
            )
        )
    return "---\n".join(docs)


def _zone(services: int, addresses: int, third: int) -> Zone:
    """Each name of _big_rules with *addresses* A records, 10.<third>.x.y."""
    zone: Zone = {}
    for i in range(services):
        for j, tail in enumerate("ab"):
            base = (i * 2 + j) * addresses
            zone[(f"svc{i}-{tail}.test", wire.TYPE_A)] = [
                f"10.{third}.{(base + k) // 250}.{(base + k) % 250 + 1}" for k in range(addresses)
            ]
    return zone


def test_a_dns_change_is_expanded_off_the_loop_the_admin_answering_meanwhile(
    fake_dns: FakeDns, tmp_path: Path, gated: GatedExpansion
) -> None:
    """Each DNS change re-expanded the whole table on the event loop: with
    thousands of ServiceEntries some 0.6 s in which nothing else ran (no
    accept, no /ready, no /stats, no control op from the supervisor). It
    is made in a thread now. Here 300 ServiceEntries of 3 ports, their 600
    names 30 addresses each (54,000 endpoint entries): the expansion is held
    in its thread while the admin endpoint answers /ready and /stats on a
    real socket, and the table goes live once it is released, the loop
    seen turning (a probe coroutine's ticks counted) while it runs."""
    from l4proxy.dataplane.listener import bind_listener
    from l4proxy.sidecar.admin import AdminServer, WorkerView
    from l4proxy.sidecar.worker import Worker, WorkerOptions

    services, ports, addresses = 300, 3, 30
    (tmp_path / "rules.yaml").write_text(_big_rules(services, ports))
    fake_dns.zone = _zone(services, addresses, 1)
    swaps: list[tuple[int, int]] = []

    def fetch(url: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def entries(w: RuleWatcher) -> tuple[int, int]:
        """(endpoint entries that are addresses, those still names)"""
        eps = [e for svc in w.state.table.services() for _, es in svc.port_endpoints for e in es]
        names = sum(1 for e in eps if e.address.endswith(".test."))
        return len(eps) - names, names

    async def main() -> tuple[int, int, float]:
        w = RuleWatcher(
            [str(tmp_path)],
            resolver=_resolver(fake_dns, tmp_path, timeout=2.0),
            on_swap=lambda st: swaps.append((st.generation, st.dns_updates)),
        )
        assert w.load_now()  # (at start: expanded on the loop, as nothing is served yet)
        assert entries(w) == (0, services * 2 * ports)
        gated.done = 0
        gated.threads.clear()
        lst = bind_listener("127.0.0.1", 0, "gateway")
        worker = Worker([lst], w, WorkerOptions())
        admin = AdminServer(WorkerView(worker, "test"), lambda: None)
        await admin.start("127.0.0.1", 0)
        url = "http://{}:{}".format(*admin.address)
        try:
            gated.hold = release = threading.Event()
            refresh = asyncio.ensure_future(w.refresh_dns())
            await _until(gated.entered.is_set, "expanding")
            # The expansion is under way (in its thread, held): the admin
            # endpoint answers, and the table live is the one before.
            ready = await asyncio.to_thread(fetch, url + "/ready")
            stats = await asyncio.to_thread(fetch, url + "/stats")
            assert ready[0] in (200, 503) and ready[1], ready  # (503: names not all looked up)
            assert stats[0] == 200 and "istio_requests_total" in stats[1], stats
            assert w.expanding and gated.done == 0 and not refresh.done()
            assert entries(w) == (0, services * 2 * ports) and w.state.dns_updates == 0
            # every name answered meanwhile: the answers after the first
            # batch's are expanded together, once it is released; the loop
            # turns all through both expansions (a probe's ticks counted
            # while the real expansion runs; on the loop: none)
            await _until(lambda: all(st.lookups for st in w.dns.names.values()), "all looked up")
            ticks, stall, stop = 0, 0.0, False

            async def probe() -> None:
                nonlocal ticks, stall
                while not stop:
                    at = time.monotonic()
                    await asyncio.sleep(0.001)
                    stall = max(stall, time.monotonic() - at)
                    ticks += gated.working

            probing = asyncio.ensure_future(probe())
            try:
                release.set()
                assert await refresh
            finally:
                stop = True
                await probing
            assert entries(w) == (services * 2 * ports * addresses, 0)
            assert w.state.dns_updates == 2 and gated.done == 2, (w.state.dns_updates, gated.done)
            assert all(name.startswith("l4proxy-rules-dns") for name in gated.threads)
            return ticks, gated.done, stall
        finally:
            await admin.close()
            worker.close()
            lst.sock.close()

    ticks, expansions, stall = asyncio.run(main())
    # On the loop, the probe never ran while an expansion did: 0 ticks. In a
    # thread it runs at each of the GIL's switches (5 ms): 6-12 seen here.
    # (*stall*, the probe's longest wait, is said, not judged: what is left
    # is the worker's work on each new table, on the loop, and collections.)
    assert expansions == 2 and ticks >= 2, (ticks, expansions, stall)
    assert all(generation == 1 for generation, _ in swaps)  # DNS swaps: no rule load


def _one_service(*rows: str, port: int = 8080) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1alpha3
        kind: ServiceEntry
        metadata: {{name: svc}}
        spec:
          hosts: [svc.test]
          ports: [{{number: {port}, name: http, protocol: HTTP}}]
          resolution: DNS
          endpoints:
        """
    ) + "".join(f"  - {{address: {row}}}\n" for row in rows)


def test_a_reload_racing_a_dns_publish_ends_with_its_table_and_the_newest_answers(
    fake_dns: FakeDns, tmp_path: Path, gated: GatedExpansion
) -> None:
    """A reload and a DNS change, each expanded in a thread, never swap in
    the other's stale table. (1) An answer that comes while the reload's
    table is being expanded: the DNS swap of the old base goes live first,
    then the reload's table, expanded again with that answer (not the one
    it started with). (2) A DNS expansion of the old base that ends after a
    reload went live: dropped (it would have put the old rules back), the
    reload's table having been expanded with that answer already."""
    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.1"]
    fake_dns.zone[("b.test", wire.TYPE_A)] = ["127.0.0.3"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(_one_service("a.test."))
    published: list[tuple[int, int, list[str]]] = []

    def on_swap(st: Any) -> None:
        (svc,) = st.table.services()
        published.append(
            (st.generation, svc.ports[0].number, sorted(e.address for e in svc.endpoints))
        )

    async def main() -> None:
        w = RuleWatcher(
            [str(rules)],
            interval=3600,
            settle=0,
            resolver=_resolver(fake_dns, tmp_path, timeout=2.0),
            dns_min_ttl=60,
            on_swap=on_swap,
        )
        assert w.load_now()
        gated.done = 0
        assert await w.refresh_dns()

        # (1) the reload's expansion held; a.test changes meanwhile
        fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.2"]
        rules.write_text(_one_service("a.test.", "b.test.", port=8081))
        gated.hold = release = threading.Event()
        gated.entered.clear()
        reload = asyncio.ensure_future(w.reload())
        await _until(gated.entered.is_set, "the reload expanding")
        w.dns.names["a.test."].next_at = 0.0
        assert await w.refresh_dns()  # the old base with 127.0.0.2: live
        assert not reload.done()
        release.set()
        assert await reload

        # (2) a DNS expansion held; a reload goes live meanwhile
        fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.4"]
        w.dns.names["a.test."].next_at = 0.0
        gated.hold = release = threading.Event()
        gated.entered.clear()
        refresh = asyncio.ensure_future(w.refresh_dns())
        await _until(gated.entered.is_set, "the DNS change expanding")
        rules.write_text(_one_service("a.test.", port=8082))
        assert await w.reload()
        release.set()
        assert await refresh
        assert w.state.generation == 3 and w.state.dns_updates == 2
        assert not w.expanding

    asyncio.run(main())
    assert published == [
        (1, 8080, ["a.test."]),
        (1, 8080, ["127.0.0.1"]),
        (1, 8080, ["127.0.0.2"]),  # the answer, while the reload was expanded
        (2, 8081, ["127.0.0.2", "127.0.0.3"]),  # expanded again: not 127.0.0.1
        (3, 8082, ["127.0.0.4"]),  # and nothing after: the stale 8081 table dropped
    ]
    assert gated.done == 6  # the first answer, (1): 2 + 1, (2): 1 + 1 (dropped)


def test_an_expansion_that_fails_is_logged_and_the_table_live_keeps_serving(
    fake_dns: FakeDns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A DNS change whose expansion raises (a bug of ours) leaves the table
    live as it was, says why in the log, and does not stop the next
    change's expansion, nor the DNS task."""
    from l4proxy.rules import watch as rulewatch

    flaky, failures = _failing_once(rulewatch.resolved_table)

    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.1"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(_one_service("a.test."))

    async def main() -> tuple[list[str], list[str], int]:
        w = RuleWatcher(
            [str(rules)], interval=3600, resolver=_resolver(fake_dns, tmp_path, timeout=2.0)
        )
        assert w.load_now()
        monkeypatch.setattr(rulewatch, "resolved_table", flaky)
        assert await w.refresh_dns()  # answered: its expansion fails
        kept = [e.address for e in w.state.table.services()[0].endpoints]
        fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.2"]
        w.dns.names["a.test."].next_at = 0.0
        assert await w.refresh_dns()
        return kept, [e.address for e in w.state.table.services()[0].endpoints], w.state.dns_updates

    with caplog.at_level("ERROR", logger="l4proxy.rules"):
        kept, after, updates = asyncio.run(main())
    assert kept == ["a.test."] and after == ["127.0.0.2"] and updates == 1
    assert not failures
    assert any(
        "expanding DNS answers" in r.getMessage() and "an expansion bug" in r.exc_text
        for r in caplog.records
        if r.exc_text
    ), [r.getMessage() for r in caplog.records]


def test_ready_waits_for_the_table_expanded_with_the_first_answers(
    fake_dns: FakeDns, tmp_path: Path, gated: GatedExpansion
) -> None:
    """/ready's INITIALIZING lasts until every DNS name had its first lookup
    *and* the table live has those answers. The expansion runs in a thread
    now, after the answers are recorded: /ready said LIVE while the table
    live still had the names (the per-request relay's 503s for their
    services), for as long as the expansion took. Here it is held in its
    thread: INITIALIZING meanwhile, LIVE once it is live, and LIVE stays
    while a later change is expanded (no flapping)."""
    from l4proxy.dataplane.listener import bind_listener
    from l4proxy.sidecar.admin import INITIALIZING, LIVE, WorkerView
    from l4proxy.sidecar.worker import Worker, WorkerOptions

    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.1"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(_one_service("a.test."))

    async def main() -> list[tuple[str, list[str]]]:
        w = RuleWatcher(
            [str(rules)], interval=3600, resolver=_resolver(fake_dns, tmp_path, timeout=2.0)
        )
        assert w.load_now()
        lst = bind_listener("127.0.0.1", 0, "gateway")
        worker = Worker([lst], w, WorkerOptions())
        view = WorkerView(worker, "test")
        seen: list[tuple[str, list[str]]] = []

        async def look() -> None:
            seen.append(
                (await view.state(), [e.address for e in w.state.table.services()[0].endpoints])
            )

        try:
            await look()
            for step in range(2):
                gated.hold = release = threading.Event()
                gated.entered.clear()
                if step:
                    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.2"]
                    w.dns.names["a.test."].next_at = 0.0
                refresh = asyncio.ensure_future(w.refresh_dns())
                await _until(gated.entered.is_set, "expanding")
                assert all(st.lookups for st in w.dns.names.values())
                await look()  # answered, the table not expanded yet
                release.set()
                assert await refresh
                await look()
            return seen
        finally:
            worker.close()
            lst.sock.close()

    assert asyncio.run(main()) == [
        (INITIALIZING, ["a.test."]),
        (INITIALIZING, ["a.test."]),  # was LIVE: answered, not live yet
        (LIVE, ["127.0.0.1"]),
        (LIVE, ["127.0.0.1"]),  # sticky: a later change expanded meanwhile
        (LIVE, ["127.0.0.2"]),
    ]


def test_stop_leaves_no_expansion_behind_an_answer_applied_as_it_stops(
    fake_dns: FakeDns, tmp_path: Path, gated: GatedExpansion
) -> None:
    """stop() (SIGTERM, a drain's or a hand-over's end) cancelled the
    expander it saw when it began: an answer applied while it waited for
    the watch task's end (the DNS task still running) started one that
    outlived it, and went on to publish a table and call the swap hook in
    a worker closing down. Now no expansion starts once stop() began, and
    one under way is cancelled: its thread, held here, ends on its own
    and nothing it made goes live."""
    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.1"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(_one_service("a.test."))
    swaps: list[int] = []

    async def main() -> tuple[int, int, bool]:
        w = RuleWatcher(
            [str(rules)],
            interval=3600,
            resolver=_resolver(fake_dns, tmp_path, timeout=2.0),
            dns_min_ttl=60,
            on_swap=lambda st: swaps.append(st.dns_updates),
        )
        assert w.load_now()
        w.start()
        await _until(lambda: w.state.dns_updates == 1, "the first answer live")
        # (1) an answer applied in the loop turn stop() waits in
        before = gated.done
        gated.hold = release = threading.Event()
        gated.entered.clear()
        stopping = asyncio.ensure_future(w.stop())
        await asyncio.sleep(0)
        assert not stopping.done()
        w.dns.names["a.test."].addresses = ("127.0.0.9",)
        w._dns_changed()  # what refresh_due's on_change does
        await stopping
        late = w._expander is not None and not w._expander.done()
        release.set()
        gated.hold = None  # (not taken, unless an expansion started)
        # (2) an expansion under way (held in its thread) when stop() comes
        w2 = RuleWatcher(
            [str(rules)], interval=3600, resolver=_resolver(fake_dns, tmp_path, timeout=2.0)
        )
        assert w2.load_now()
        w2.start()
        gated.hold = release2 = threading.Event()
        gated.entered.clear()
        await _until(gated.entered.is_set, "expanding")
        await w2.stop()
        assert w2._expander is not None and w2._expander.cancelled()
        release2.set()
        await _until(lambda: gated.done >= 1, "the held thread ended")
        await asyncio.sleep(0.1)
        return w.state.dns_updates + w2.state.dns_updates, gated.done - before, late

    updates, done, late = asyncio.run(main())
    assert not late
    assert updates == 1 and swaps == [0, 1], (updates, swaps)  # the load, its first answer
    assert done == 2  # (2)'s load and its thread; (1)'s never started


def test_an_expansion_that_failed_is_made_again_at_the_next_refresh_without_a_change(
    fake_dns: FakeDns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expansion that fails (a bug of ours) left the answers out of the
    table until some name's addresses *changed*: a name whose answer stays
    the same stayed a name (a host name where a pod address was meant) for
    good. The next refresh, answers unchanged, makes it again."""
    from l4proxy.rules import watch as rulewatch

    flaky, failures = _failing_once(rulewatch.resolved_table)

    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.1"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(_one_service("a.test."))

    async def main() -> tuple[list[str], bool, list[str], int]:
        w = RuleWatcher(
            [str(rules)], interval=3600, resolver=_resolver(fake_dns, tmp_path, timeout=2.0)
        )
        assert w.load_now()
        monkeypatch.setattr(rulewatch, "resolved_table", flaky)
        assert await w.refresh_dns()  # answered: its expansion fails
        kept = [e.address for e in w.state.table.services()[0].endpoints]
        w.dns.names["a.test."].next_at = 0.0
        changed = await w.refresh_dns()  # the same answer
        after = [e.address for e in w.state.table.services()[0].endpoints]
        return kept, changed, after, w.state.dns_updates

    kept, changed, after, updates = asyncio.run(main())
    assert kept == ["a.test."] and not changed and not failures
    assert after == ["127.0.0.1"] and updates == 1


def test_a_refused_reload_while_a_dns_change_is_expanded_keeps_the_last_good_rules(
    fake_dns: FakeDns, tmp_path: Path, gated: GatedExpansion
) -> None:
    """A reload refused (invalid rules) while a DNS change's expansion is
    held in its thread: the last good rules keep serving, and that change's
    answers go live in them once it ends (the base it expanded is still the
    one live); then a valid reload goes live with the same answers."""
    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.1"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(_one_service("a.test."))
    published: list[tuple[int, int, list[str]]] = []

    def on_swap(st: Any) -> None:
        (svc,) = st.table.services()
        published.append(
            (st.generation, svc.ports[0].number, sorted(e.address for e in svc.endpoints))
        )

    async def main() -> tuple[str | None, bool]:
        w = RuleWatcher(
            [str(rules)],
            interval=3600,
            settle=0,
            resolver=_resolver(fake_dns, tmp_path, timeout=2.0),
            dns_min_ttl=60,
            on_swap=on_swap,
        )
        assert w.load_now()
        gated.hold = release = threading.Event()
        gated.entered.clear()
        refresh = asyncio.ensure_future(w.refresh_dns())
        await _until(gated.entered.is_set, "the DNS change expanding")
        rules.write_text(_one_service("a.test.", port=8081) + "  - {address: [not, valid]}\n")
        assert not await w.reload()
        error = w.state.last_error
        release.set()
        assert await refresh
        rules.write_text(_one_service("a.test.", port=8082))
        assert await w.reload()
        return error, w.expanding

    error, expanding = asyncio.run(main())
    assert error and not expanding
    assert published == [
        (1, 8080, ["a.test."]),
        (1, 8080, ["127.0.0.1"]),  # the last good rules, with the answer
        (2, 8082, ["127.0.0.1"]),
    ]


def test_stop_cancels_a_late_load_being_expanded(
    fake_dns: FakeDns, tmp_path: Path, gated: GatedExpansion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load past its deadline that ends later goes live from a task of its
    own (ended_late), which now awaits its table's DNS expansion in a thread
    too. stop() left that task running: released after the stop, it swapped
    its rules in (generation 2, the swap hook called) in a worker closing
    down. It is cancelled with the others now."""
    from l4proxy.rules import watch as rulewatch

    fake_dns.zone[("a.test", wire.TYPE_A)] = ["127.0.0.1"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(_one_service("a.test."))
    w = RuleWatcher(
        [str(rules)],
        interval=3600,
        settle=0,
        resolver=_resolver(fake_dns, tmp_path, timeout=2.0),
        load_deadline=0.1,
    )
    assert w.load_now()
    real = rulewatch.load_rules

    def slow(*args: Any, **kw: Any) -> Any:
        time.sleep(0.4)
        return real(*args, **kw)

    monkeypatch.setattr(rulewatch, "load_rules", slow)
    rules.write_text(_one_service("a.test.", port=8081))

    async def main() -> None:
        gated.hold = release = threading.Event()
        gated.entered.clear()
        assert not await w.reload()  # past its deadline
        assert w.stuck is not None
        await _until(gated.entered.is_set, "the late load's expansion")
        await w.stop()
        release.set()
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert w.state.generation == 1 and w.state.table.services()[0].ports[0].number == 8080


def test_a_dns_swap_hands_the_hooks_a_prepared_frozen_table(
    fake_dns: FakeDns, tmp_path: Path
) -> None:
    """At a DNS swap the worker's hooks computed on the loop what they read
    of the new table (every endpoint it names, its pool settings and outlier
    policies: ~270-320 ms there with 54,000 entries), and the collector then
    examined the new table's objects on the loop in a young, a middle and a
    full pass (2 x ~70 ms). Now the table comes prepared from the expansion's
    thread (RouteTable.prepare) and frozen with the heap (lean): the hooks'
    effects hold (outlier state and overflow counts of the endpoints gone
    are dropped), computed nowhere on the loop's thread (counted), and the
    table's objects are in no generation the collector examines."""
    from l4proxy.sidecar.worker import Worker, WorkerOptions

    services, ports, addresses = 20, 2, 5
    (tmp_path / "rules.yaml").write_text(_big_rules(services, ports))
    fake_dns.zone = _zone(services, addresses, 1)
    computed: list[str] = []
    real_pools, real_outliers = (
        RouteTable._compute_pool_settings,
        RouteTable._compute_outlier_policies,
    )

    def pools(self: RouteTable) -> Any:
        computed.append(threading.current_thread().name)
        return real_pools(self)

    def outliers(self: RouteTable) -> Any:
        computed.append(threading.current_thread().name)
        return real_outliers(self)

    async def main() -> None:
        w = RuleWatcher([str(tmp_path)], resolver=_resolver(fake_dns, tmp_path, timeout=2.0))
        assert w.load_now()
        worker = Worker([], w, WorkerOptions())
        prepared: list[bool] = []
        w.on_publish.insert(0, lambda t: prepared.append(t._named_endpoints is not None))
        try:
            assert await w.refresh_dns()
            gone = Endpoint("10.1.0.1", 8000)
            assert (gone.address, gone.port) in w.state.table.named_endpoints()
            worker.health.failure(gone, "refused")
            worker.cx_overflows[(gone.address, gone.port)] = 3
            assert worker.health.describe(gone)["consecutive_failures"] == 1
            for st in w.dns.names.values():
                st.next_at = 0
            fake_dns.zone = _zone(services, addresses, 2)  # every address changed
            computed.clear()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(RouteTable, "_compute_pool_settings", pools)
                mp.setattr(RouteTable, "_compute_outlier_policies", outliers)
                assert await w.refresh_dns()
            table = w.state.table
            named = table.named_endpoints()
            assert len(named) == services * 2 * addresses * ports
            assert (gone.address, gone.port) not in named
            # the hooks' effects: the gone endpoint's state and count dropped
            assert worker.health.describe(gone)["consecutive_failures"] == 0
            assert (gone.address, gone.port) not in worker.cx_overflows
            # prepared in the thread: nothing computed on the loop's thread
            assert prepared and all(prepared), prepared
            assert computed and all(n.startswith("l4proxy-rules-dns") for n in computed), computed
            # frozen: tracked, in no generation the collector examines
            svc = table.services()[0]
            assert gc.is_tracked(svc.endpoints) or gc.is_tracked(svc)
            young = {id(o) for o in gc.get_objects()}
            assert gc.get_freeze_count() > 0
            assert id(svc) not in young and id(table.__dict__) not in young
        finally:
            worker.close()
            gc.unfreeze()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("address", "is_address"),
    [
        ("10.0.0.1", True),
        ("0.0.0.0", True),
        ("1234", False),  # inet_aton's forms: names to the resolver, as before
        ("1.2.3", False),
        ("127.1", False),
        ("0x7f.0.0.1", False),
        ("10.0.0.256", False),
        ("01.2.3.4", False),
        ("1.2.3.4.", False),  # a trailing dot: a name
        ("1..2.3", False),
        ("", False),
        ("٣.١.٢.٣", False),  # digits to str.isdigit, not to ipaddress
        ("１.２.３.４", False),
        ("::1", True),
        ("::ffff:10.0.0.1", True),  # IPv4-mapped
        ("fe80::1%eth0", True),  # a zone id
        ("[::1]", False),  # bracketed: not an address
        ("1.2.3.4%eth0", False),
        ("1.2.3.4:80", False),
        ("svc-1.test.", False),
        ("1e3", False),
    ],
)
def test_a_host_name_is_told_from_an_address_as_ipaddress_tells_them(
    address: str, is_address: bool
) -> None:
    """dns_names and _resolved skip ipaddress's parse for what cannot be an
    address (no colon, a character other than a digit or a dot): each form,
    all-digit names and inet_aton's shorthands included, is told as
    ipaddress.ip_address tells it."""
    from l4proxy.rules.dns import _is_ip

    try:
        ipaddress.ip_address(address)
        parsed = True
    except ValueError:
        parsed = False
    assert _is_ip(address) is parsed is is_address


@given(st.text(alphabet="0123456789.:abcdefx%[] ٣２²", max_size=20))
def test_the_name_test_agrees_with_ipaddress_on_any_string(address: str) -> None:
    from l4proxy.rules.dns import _is_ip

    try:
        ipaddress.ip_address(address)
        parsed = True
    except ValueError:
        parsed = False
    assert _is_ip(address) is parsed


def test_frozen_dns_swaps_leave_no_replaced_table_behind(
    fake_dns: FakeDns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS expansion freezes the heap with its table in it (lean), and the
    heap is collected whole only every FULL_PASS_EVERY expansions: a table
    that formed a reference cycle would stay, frozen, until then (fifteen
    tables of tens of thousands of entries). Each table a swap replaces is
    freed by reference counting at once: after fewer swaps than
    FULL_PASS_EVERY, no collection run, none of them is left."""
    import weakref

    from l4proxy.sidecar import lean

    monkeypatch.setattr(lean, "_expansions", 0)  # (no full pass in this test)
    services, ports, addresses = 10, 2, 3
    (tmp_path / "rules.yaml").write_text(_big_rules(services, ports))
    fake_dns.zone = _zone(services, addresses, 1)
    swaps = lean.FULL_PASS_EVERY // 2

    async def main() -> list[weakref.ref[RouteTable]]:
        w = RuleWatcher([str(tmp_path)], resolver=_resolver(fake_dns, tmp_path, timeout=2.0))
        assert w.load_now()
        replaced: list[weakref.ref[RouteTable]] = []
        try:
            for i in range(swaps):
                for name in w.dns.names.values():
                    name.next_at = 0
                fake_dns.zone = _zone(services, addresses, 2 + i)
                live = w.state.table
                assert await w.refresh_dns()
                assert w.state.table is not live and gc.get_freeze_count() > 0
                if live is not w.base:
                    replaced.append(weakref.ref(live))
                del live
        finally:
            await w.stop()
        return replaced

    was = gc.isenabled()
    try:
        replaced = asyncio.run(main())
        assert len(replaced) >= swaps - 1
        assert [r for r in replaced if r() is not None] == []
    finally:
        gc.unfreeze()
        if was:
            gc.enable()


def _failing_once(real: Any) -> tuple[Any, list[RuntimeError]]:
    """*real* (resolved_table), whose first call raises (an expansion bug),
    and the failures still to raise (empty once it raised)."""
    failures = [RuntimeError("an expansion bug")]

    def flaky(base: RouteTable, states: Any) -> RouteTable:
        if failures:
            raise failures.pop()
        result: RouteTable = real(base, states)
        return result

    return flaky, failures

"""DNS messages for A/AAAA lookups, sans-IO (RFC 1035, RFC 2308, RFC 6891).

:func:`encode_query` builds one question with an EDNS0 OPT record (a 1232-byte
UDP payload, the DNS flag day value: large enough for a headless Service with
dozens of pods, small enough never to fragment). :func:`parse_response`
checks that the reply answers that question and returns the addresses of the
name (following CNAMEs in the answer section), the TTL to cache them for, and
whether the reply was truncated (then ask again over TCP). It raises
:class:`DnsError` for anything else, never another exception: the input is
whatever arrived on a UDP port.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

TYPE_A = 1
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NAMES = {1: "FORMERR", 2: "SERVFAIL", 4: "NOTIMP", 5: "REFUSED"}

UDP_PAYLOAD = 1232
MAX_CNAME_CHAIN = 8


class DnsError(Exception):
    """A lookup failed: no usable answer (the last good addresses stay)."""


class DnsServerError(DnsError):
    """The server answered with an error rcode (SERVFAIL, REFUSED, ...)."""


@dataclass(frozen=True)
class Answer:
    """The addresses for one question. Empty with ``negative``: the name has none."""

    addresses: tuple[str, ...]
    ttl: float | None
    negative: bool = False
    truncated: bool = False
    nxdomain: bool = False  # negative, and for every type: the name does not exist


def ascii_name(name: str) -> str:
    """*name* as it is on the wire and as replies spell it: lower case, no
    trailing dot, non-ASCII labels IDNA-encoded (``xn--...``)."""
    labels = name.lower().rstrip(".").split(".")
    return ".".join(
        label if label.isascii() else label.encode("idna").decode("ascii") for label in labels
    )


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna") if not label.isascii() else label.encode()
        if not 0 < len(raw) < 64:
            raise DnsError(f"bad name {name!r}: empty label or label over 63 bytes")
        out += bytes([len(raw)]) + raw
    out += b"\x00"
    if len(out) > 255:
        raise DnsError(f"bad name {name!r}: longer than 255 bytes")
    return bytes(out)


def encode_query(qid: int, name: str, qtype: int) -> bytes:
    """A recursive query for *name*/*qtype* (class IN) with an EDNS0 OPT record."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1)  # RD; 1 question, 1 additional
    question = encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
    opt = b"\x00" + struct.pack("!HHIH", TYPE_OPT, UDP_PAYLOAD, 0, 0)
    return header + question + opt


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The (lower-case) name at *offset* and the offset after it; follows pointers."""
    labels: list[str] = []
    end = -1
    jumps = 0
    pos = offset
    while True:
        if pos >= len(data):
            raise DnsError("truncated name")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsError("truncated name pointer")
            if end < 0:
                end = pos + 2
            jumps += 1
            if jumps > 64:
                raise DnsError("name pointer loop")
            pos = ((length & 0x3F) << 8) | data[pos + 1]
            continue
        if length & 0xC0:
            raise DnsError("unknown label type")
        pos += 1
        if length == 0:
            break
        if pos + length > len(data):
            raise DnsError("truncated label")
        labels.append(data[pos : pos + length].decode("ascii", "replace").lower())
        pos += length
    return ".".join(labels), (end if end >= 0 else pos)


@dataclass(frozen=True)
class _Record:
    name: str
    rtype: int
    ttl: int
    rdata_at: int
    rdlength: int


def _read_records(data: bytes, offset: int, count: int) -> tuple[list[_Record], int]:
    out = []
    for _ in range(count):
        name, offset = _read_name(data, offset)
        if offset + 10 > len(data):
            raise DnsError("truncated record")
        rtype, _rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        if offset + rdlength > len(data):
            raise DnsError("truncated record data")
        # RFC 2181 section 8: a TTL with the top bit set is read as 0
        out.append(_Record(name, rtype, ttl if ttl < 0x80000000 else 0, offset, rdlength))
        offset += rdlength
    return out, offset


def parse_response(data: bytes, qid: int, name: str, qtype: int) -> Answer:
    """Addresses of *name* for *qtype* in the reply *data* to query *qid*."""
    try:
        return _parse(data, qid, ascii_name(name), qtype)
    except DnsError:
        raise
    except (struct.error, IndexError, ValueError, UnicodeError) as exc:
        raise DnsError(f"malformed reply: {exc}") from None


def _parse(data: bytes, qid: int, qname: str, qtype: int) -> Answer:
    if len(data) < 12:
        raise DnsError("reply shorter than a header")
    rid, flags, qdcount, ancount, nscount, _arcount = struct.unpack_from("!HHHHHH", data)
    if rid != qid or not flags & 0x8000:
        raise DnsError("reply does not answer our query")
    truncated = bool(flags & 0x0200)
    rcode = flags & 0x000F
    offset = 12
    if qdcount != 1:
        raise DnsError(f"reply has {qdcount} questions, expected 1")
    asked, offset = _read_name(data, offset)
    if offset + 4 > len(data):
        raise DnsError("truncated question")
    atype, _aclass = struct.unpack_from("!HH", data, offset)
    offset += 4
    if asked != qname or atype != qtype:
        raise DnsError(f"reply is for {asked} type {atype}, not {qname} type {qtype}")
    if truncated and ancount == 0:
        return Answer((), None, truncated=True)
    if rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        raise DnsServerError(RCODE_NAMES.get(rcode, f"rcode {rcode}"))
    answers, offset = _read_records(data, offset, ancount)
    authority, offset = _read_records(data, offset, nscount) if not truncated else ([], offset)

    # Follow the CNAME chain from the question's name; addresses belong to its end.
    chain = {qname}
    ttls: list[int] = []
    for _ in range(MAX_CNAME_CHAIN):
        grew = False
        for rec in answers:
            if rec.rtype == TYPE_CNAME and rec.name in chain:
                target, _ = _read_name(data, rec.rdata_at)
                if target not in chain:
                    chain.add(target)
                    ttls.append(rec.ttl)
                    grew = True
        if not grew:
            break
    size = 4 if qtype == TYPE_A else 16
    addresses: list[str] = []
    for rec in answers:
        if rec.rtype == qtype and rec.name in chain and rec.rdlength == size:
            raw = data[rec.rdata_at : rec.rdata_at + size]
            addr = str(ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw))
            if addr not in addresses:
                addresses.append(addr)
            ttls.append(rec.ttl)
    if addresses:
        return Answer(tuple(addresses), float(min(ttls)), truncated=truncated)
    if truncated:
        return Answer((), None, truncated=True)
    # Negative answer (NXDOMAIN, or NOERROR without records): cache for the
    # SOA's negative TTL, min(SOA TTL, SOA MINIMUM) (RFC 2308 section 5).
    neg_ttl: float | None = None
    for rec in authority:
        if rec.rtype == TYPE_SOA:
            _mname, pos = _read_name(data, rec.rdata_at)
            _rname, pos = _read_name(data, pos)
            if pos + 20 <= rec.rdata_at + rec.rdlength:
                minimum = struct.unpack_from("!I", data, pos + 16)[0]
                neg_ttl = float(min(rec.ttl, minimum))
            break
    return Answer((), neg_ttl, negative=True, nxdomain=rcode == RCODE_NXDOMAIN)


def truncated_flag(data: bytes) -> bool:
    """Whether a reply's header has TC set (read even when the rest cannot be)."""
    return len(data) >= 4 and bool(data[2] & 0x02)


def encode_response(
    query: bytes,
    records: list[tuple[str, int, int, bytes]],
    *,
    rcode: int = RCODE_NOERROR,
    truncated: bool = False,
    authority: list[tuple[str, int, int, bytes]] | None = None,
) -> bytes:
    """A reply to *query* with (name, type, ttl, rdata) records (tests; a fake server)."""
    qid = struct.unpack_from("!H", query)[0]
    _, end = _read_name(query, 12)
    question = query[12 : end + 4]
    flags = 0x8180 | rcode | (0x0200 if truncated else 0)
    auth = authority or []
    out = struct.pack("!HHHHHH", qid, flags, 1, len(records), len(auth), 0) + question
    for rname, rtype, ttl, rdata in [*records, *auth]:
        out += encode_name(rname) + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata
    return out

"""DNS for transparent egress, sans-IO: read one query, write one answer, and the placeholder address book.

Hand-written on the stdlib because odyn's binary must stay small and this parser is an attack surface we fuzz.

The app in the enclave resolves through a responder on 127.0.0.1:53. A name the egress policy allows gets a
placeholder IPv4 address from `AddressBook`; when the app connects to that address, the egress side asks the
book which name it stands for and opens the real connection by name on the host. A denied name gets NXDOMAIN.
No real resolution ever happens inside the enclave, so these answers only have to be well-formed and
consistent, not true.

What is accepted is deliberately narrow (see `parse_query`): one question, no compression, letters, digits,
`-` and `_` only. Every malformed input raises `DnsError` carrying the RCODE to answer with — never another
exception type, never a hang — so the socket loop around this module needs exactly one `except`.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

# RCODEs (RFC 1035 §4.1.1); the names the socket loop will want
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
# Types and classes the policy glue will compare `Question` fields against
TYPE_A, TYPE_AAAA, TYPE_ANY = 1, 28, 255
CLASS_IN, CLASS_ANY = 1, 255

HEADER_LEN = 12
MAX_NAME_WIRE = 255  # RFC 1035 §3.1, counting length bytes and the root's zero byte
MAX_LABEL = 63
MAX_TTL = (1 << 31) - 1  # RFC 2181 §8: TTLs are 31-bit

# Header flag bits (RFC 1035 §4.1.1, RFC 4035 §3.2 for CD)
_QR, _AA, _RD, _CD = 0x8000, 0x0400, 0x0100, 0x0010
_OPCODE_MASK = 0x7800
_LABEL_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


class DnsError(ValueError):
    """A query we will not answer normally; `rcode` is what to answer instead (FORMERR or NOTIMP)."""

    def __init__(self, rcode: int, message: str) -> None:
        super().__init__(message)
        self.rcode = rcode
        self.message = message


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # lower-case, no trailing dot, IDNA/ASCII as on the wire; "" is the root
    qtype: int
    qclass: int


@dataclass(frozen=True, slots=True)
class Query:
    id: int
    flags: int  # the query's 16 header flag bits as received
    question: Question
    raw_question: bytes  # the question section exactly as received, echoed back so the client's match succeeds


def header_id(packet: bytes) -> int | None:
    """The message ID, when there are at least two bytes to hold one — enough to address an error answer."""
    return int.from_bytes(packet[:2], "big") if len(packet) >= 2 else None


def _u16(packet: bytes, offset: int) -> int:
    return int.from_bytes(packet[offset:offset + 2], "big")


def _read_question(packet: bytes) -> tuple[Question, bytes]:
    """The single question at offset 12; raises FORMERR on anything we do not accept.

    Compression pointers are refused rather than followed: the question is the first name in a message,
    so a pointer there can only point at the header or at itself — legitimate clients never send one,
    and not following pointers removes the loop and out-of-bounds cases from the parser altogether.
    """
    pos, labels = HEADER_LEN, []
    while True:
        if pos >= len(packet):
            raise DnsError(FORMERR, "truncated question name")
        length = packet[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0 == 0xC0:
            raise DnsError(FORMERR, "compression pointer in the question")
        if length > MAX_LABEL:  # 0x40 and 0x80 prefixes: extended label types (RFC 6891 §5), or just too long
            raise DnsError(FORMERR, f"label of {length} bytes (at most {MAX_LABEL})")
        label = packet[pos + 1:pos + 1 + length]
        if len(label) < length:
            raise DnsError(FORMERR, "truncated label")
        if not _LABEL_BYTES.issuperset(label):
            raise DnsError(FORMERR, "name has characters other than letters, digits, '-' and '_'")
        labels.append(label.translate(_LOWER).decode("ascii"))
        pos += 1 + length
        if pos + 1 - HEADER_LEN > MAX_NAME_WIRE:  # +1: the root label still to come
            raise DnsError(FORMERR, f"name longer than {MAX_NAME_WIRE} bytes")
    if pos + 4 > len(packet):
        raise DnsError(FORMERR, "truncated question type/class")
    question = Question(".".join(labels), _u16(packet, pos), _u16(packet, pos + 2))
    return question, packet[HEADER_LEN:pos + 4]


def parse_query(packet: bytes) -> Query:
    """One standard query with exactly one question, or `DnsError`.

    Header rules: QR must be 0 (FORMERR otherwise), OPCODE must be QUERY (NOTIMP otherwise), QDCOUNT exactly
    1, ANCOUNT and NSCOUNT 0, ARCOUNT 0 or 1 (FORMERR otherwise). The other flag bits (TC, RD, Z, AD, CD,
    RCODE) are not checked: clients set AD/CD freely and none of them changes what we answer.

    Everything after the question is ignored, unread. ARCOUNT=1 is allowed because stub resolvers (glibc with
    `options edns0`, dig, systemd) attach an EDNS OPT record; we never need its contents — our answers are far
    below 512 bytes — so we do not parse it, and whatever it carries (a TSIG, garbage) can reach no code.
    Answers carry no OPT record, which RFC 6891 §7 clients read as "no EDNS here" and cope with.
    """
    if len(packet) < HEADER_LEN:
        raise DnsError(FORMERR, f"{len(packet)} bytes is shorter than a DNS header")
    flags = _u16(packet, 2)
    if flags & _QR:
        raise DnsError(FORMERR, "message is a response, not a query")
    if flags & _OPCODE_MASK:
        raise DnsError(NOTIMP, f"opcode {(flags & _OPCODE_MASK) >> 11} is not QUERY")
    qdcount, ancount, nscount, arcount = (_u16(packet, offset) for offset in (4, 6, 8, 10))
    if qdcount != 1:
        raise DnsError(FORMERR, f"{qdcount} questions (exactly one is supported)")
    if ancount or nscount:
        raise DnsError(FORMERR, "a query must not carry answer or authority records")
    if arcount > 1:
        raise DnsError(FORMERR, f"{arcount} additional records (at most one, for EDNS)")
    question, raw = _read_question(packet)
    return Query(_u16(packet, 0), flags, question, raw)


def _response(ident: int, query_flags: int, rcode: int, question: bytes, answers: int, body: bytes = b"") -> bytes:
    """Header flags of every answer: QR=1, OPCODE and RD and CD copied (RFC 1035 §4.1.1, RFC 4035 §3.1.6),
    AA=1 for NOERROR and NXDOMAIN, RA=0, TC=0, AD=0.

    AA matters: glibc (res_send) and Go's resolver treat a NOERROR answer with no records, AA=0 and RA=0 as
    a lame referral and go on to the next nameserver instead of returning "no AAAA record" — and for the
    names we answer we are the authority, since the addresses are ours. RA=0 because we do no recursion (dig
    warns "recursion requested but not available"; resolvers used by applications do not care).
    """
    flags = _QR | (query_flags & (_OPCODE_MASK | _RD | _CD)) | rcode
    if rcode in (NOERROR, NXDOMAIN):
        flags |= _AA
    header = b"".join(n.to_bytes(2, "big") for n in (ident, flags, 1 if question else 0, answers, 0, 0))
    return header + question + body


def answer_a(query: Query, address: ipaddress.IPv4Address, ttl: int) -> bytes:
    """NOERROR with the question and one A record for it (its owner a pointer to offset 12, the question's name).

    Only for questions of type A or ANY in class IN or ANY; anything else is a bug in the caller (an A record
    answering an AAAA question confuses clients), so ValueError.
    """
    question = query.question
    if question.qtype not in (TYPE_A, TYPE_ANY) or question.qclass not in (CLASS_IN, CLASS_ANY):
        raise ValueError(f"an A record does not answer type {question.qtype} class {question.qclass}")
    if not 0 <= ttl <= MAX_TTL:
        raise ValueError(f"TTL {ttl} out of 0..{MAX_TTL}")
    record = (b"\xc0\x0c" + TYPE_A.to_bytes(2, "big") + CLASS_IN.to_bytes(2, "big") + ttl.to_bytes(4, "big")
              + (4).to_bytes(2, "big") + address.packed)
    return _response(query.id, query.flags, NOERROR, query.raw_question, 1, record)


def answer_empty(query: Query) -> bytes:
    """NOERROR, no records ("NODATA"): the name exists but has no record of this type. Said to AAAA (and
    other types) of an allowed name so clients settle for its A record instead of failing the lookup."""
    return _response(query.id, query.flags, NOERROR, query.raw_question, 0)


def answer_error(packet: bytes, rcode: int) -> bytes | None:
    """An error answer (NXDOMAIN, FORMERR, NOTIMP, REFUSED, SERVFAIL, …) to whatever `packet` is.

    The question is echoed when the packet is a QUERY with one question we can read (clients match answers
    on it); otherwise the answer is a bare header echoing the ID. None means: send nothing — the packet is
    too short to hold an ID, or it is itself a response (QR=1), and answering responses is how two DNS
    speakers end up bouncing errors at each other forever.
    """
    if not 1 <= rcode <= 15:
        raise ValueError(f"rcode {rcode} is not an error RCODE (1..15); NOERROR answers are answer_empty")
    ident = header_id(packet)
    if ident is None:
        return None
    flags = _u16(packet, 2) if len(packet) >= 4 else (packet[2] << 8 if len(packet) == 3 else 0)
    if flags & _QR:
        return None
    question = b""
    if len(packet) >= HEADER_LEN and not flags & _OPCODE_MASK and _u16(packet, 4) == 1:
        with contextlib.suppress(DnsError):  # unreadable: a bare header still carries the ID and RCODE
            question = _read_question(packet)[1]
    return _response(ident, flags, rcode, question, 0)


DEFAULT_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
DEFAULT_CAPACITY = 4096  # a few hundred bytes an entry, ~1 MiB full: far more names than an app talks to


class AddressBook:
    """Placeholder IPv4 addresses for allowed names: stable while a name is in the book, bounded in size.

    Why 198.18.0.0/15: RFC 2544 reserves it for benchmarking and RFC 6890 lists it as not globally reachable,
    so a placeholder can never be mistaken for (or collide with) a real destination — not a VPC's 10/8 or
    172.16/12, not 169.254.169.254 — and if one ever leaked out of the enclave it would route nowhere real.
    Fake-IP resolvers (Clash, sing-box) use the same range for the same reason. A /15 also has room
    (131070 usable addresses) so a default-sized book never comes near running out.

    Why LRU: names come from the app, and an app that resolves attacker-influenced names could otherwise grow
    the table without limit inside an enclave's fixed memory. When full, the name evicted is the one nobody
    has resolved or connected to for longest, so its address is the least likely still held by the app
    (answers carry short TTLs); reusing it can only ever point at another *allowed* name, since denied names
    never get an address. Both `address_for` and `name_for` count as use: a connection to an address keeps
    its mapping alive.

    Addresses are handed out in order from the first host of the network; the network and broadcast
    addresses are never used.
    """

    def __init__(self, network: ipaddress.IPv4Network | str = DEFAULT_NETWORK, capacity: int | None = None) -> None:
        """`capacity` defaults to DEFAULT_CAPACITY, or every usable address of a network smaller than that."""
        self.network = ipaddress.IPv4Network(network)
        self._first = int(self.network.network_address) + 1
        usable = self.network.num_addresses - 2  # no network, no broadcast address
        if usable < 1:
            raise ValueError(f"{self.network} has no usable host addresses (network and broadcast are excluded)")
        if capacity is None:
            capacity = min(DEFAULT_CAPACITY, usable)
        if not 1 <= capacity <= usable:
            raise ValueError(f"capacity {capacity} out of 1..{usable} for {self.network}")
        self.capacity = capacity
        self._by_name: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._by_address: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def address_for(self, name: str) -> ipaddress.IPv4Address:
        """The name's address, allotting one (evicting the least recently used name when full).

        `name` is used as given — pass `Question.name`, already lower-case without a trailing dot."""
        address = self._by_name.get(name)
        if address is not None:
            self._by_name.move_to_end(name)
            return ipaddress.IPv4Address(address)
        if len(self._by_name) < self.capacity:
            address = self._first + len(self._by_name)  # nothing is ever removed without being replaced
        else:
            _, address = self._by_name.popitem(last=False)
            del self._by_address[address]
        self._by_name[name] = address
        self._by_address[address] = name
        return ipaddress.IPv4Address(address)

    def name_for(self, address: ipaddress.IPv4Address) -> str | None:
        """The name an address currently stands for, or None (never handed out, or outside the network)."""
        name = self._by_address.get(int(address))
        if name is not None:
            self._by_name.move_to_end(name)
        return name

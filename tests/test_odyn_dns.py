"""odyn's DNS responder, sans-IO: hand-built packets with exact RCODEs, dnspython as an independent oracle for
both directions of the wire format, fuzzing (arbitrary and mutated packets), and the address book against a
model LRU."""

from __future__ import annotations

import ipaddress
import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from odyn.dns import (
    CLASS_IN,
    FORMERR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    AddressBook,
    DnsError,
    Query,
    Question,
    answer_a,
    answer_empty,
    answer_error,
    header_id,
    parse_query,
)

RD = 0x0100
OPT = b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)  # EDNS0: root owner, type OPT, 1232-byte UDP size


def wire_name(name: str | list[bytes]) -> bytes:
    labels = [label.encode() for label in name.split(".")] if isinstance(name, str) else name
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def packet(name: str | list[bytes] = "example.com", qtype: int = TYPE_A, qclass: int = CLASS_IN, *,
           ident: int = 0x1234, flags: int = RD, counts: tuple[int, int, int, int] = (1, 0, 0, 0),
           tail: bytes = b"") -> bytes:
    """A query as a stub resolver sends it; every field overridable to build the broken ones."""
    question = wire_name(name) + struct.pack(">HH", qtype, qclass)
    return struct.pack(">6H", ident, flags, *counts) + question + tail


def rcode_of(data: bytes) -> int:
    with pytest.raises(DnsError) as caught:
        parse_query(data)
    assert type(caught.value) is DnsError
    return caught.value.rcode


# --- parsing hand-built queries ---------------------------------------------------------------------------

def test_a_query() -> None:
    data = packet("api.example.com")
    query = parse_query(data)
    assert query == Query(0x1234, RD, Question("api.example.com", TYPE_A, CLASS_IN), data[12:])


def test_aaaa_query() -> None:
    assert parse_query(packet("example.com", TYPE_AAAA)).question == Question("example.com", TYPE_AAAA, CLASS_IN)


def test_edns_opt_record_is_allowed_and_not_part_of_the_question() -> None:
    data = packet(counts=(1, 0, 0, 1), tail=OPT)
    query = parse_query(data)
    assert query.question.name == "example.com" and query.raw_question == data[12:-len(OPT)]
    # the additional section is never read: its contents cannot matter
    assert parse_query(packet(counts=(1, 0, 0, 1), tail=b"\xff" * 7)).question.name == "example.com"


def test_flags_other_than_qr_and_opcode_are_accepted() -> None:
    ad_cd_z = 0x0020 | 0x0010 | 0x0040
    assert parse_query(packet(flags=RD | ad_cd_z)).flags == RD | ad_cd_z
    assert parse_query(packet(flags=0)).flags == 0


def test_names_are_lower_cased_and_keep_underscores_and_hyphens() -> None:
    assert parse_query(packet("_Acme-Challenge.WWW.Example.COM")).question.name == "_acme-challenge.www.example.com"


def test_root_name_is_the_empty_string() -> None:
    assert parse_query(packet([])).question.name == ""


def test_longest_label_and_longest_name() -> None:
    assert parse_query(packet([b"a" * 63, b"com"])).question.name == "a" * 63 + ".com"
    longest = [b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61]  # 4 + 250 + root byte = 255 wire bytes
    assert len(wire_name(longest)) == 255
    query = parse_query(packet(longest))
    assert len(query.question.name) == 253 and query.raw_question == wire_name(longest) + b"\x00\x01\x00\x01"


@pytest.mark.parametrize(("data", "rcode"), [
    (b"", FORMERR),
    (b"\x12", FORMERR),
    (packet()[:11], FORMERR),  # truncated header
    (packet()[:12], FORMERR),  # header, no question
    (packet()[:-1], FORMERR),  # truncated class
    (packet()[:-4], FORMERR),  # no type/class
    (packet()[:17], FORMERR),  # truncated label
    (packet(flags=0x8000 | RD), FORMERR),  # QR=1: a response
    (packet(flags=2 << 11), NOTIMP),  # opcode STATUS
    (packet(flags=4 << 11), NOTIMP),  # opcode NOTIFY
    (packet(flags=5 << 11), NOTIMP),  # opcode UPDATE
    (packet(counts=(0, 0, 0, 0))[:12], FORMERR),
    (packet(counts=(0, 0, 0, 0)), FORMERR),
    (packet(counts=(2, 0, 0, 0)) + wire_name("b.com") + b"\x00\x01\x00\x01", FORMERR),
    (packet(counts=(1, 1, 0, 0)), FORMERR),
    (packet(counts=(1, 0, 1, 0)), FORMERR),
    (packet(counts=(1, 0, 0, 2), tail=OPT + OPT), FORMERR),
    (struct.pack(">6H", 1, RD, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", FORMERR),  # pointer to itself
    (packet([b"www"])[:-5] + b"\xc0\x0c\x00\x01\x00\x01", FORMERR),  # pointer after a label
    (packet([b"a" * 64, b"com"]), FORMERR),
    (packet([b"\x40"]), FORMERR),
    (packet([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 62]), FORMERR),  # 256 wire bytes
    (packet([b"a" * 63] * 5), FORMERR),
    (packet([b"a" * 63] * 4)[:12 + 64 * 4], FORMERR),  # too long *and* truncated
    (packet([b"bad name"]), FORMERR),
    (packet([b"*", b"example", b"com"]), FORMERR),
    (packet([b"a.b", b"com"]), FORMERR),  # a dot inside a label
    (packet([b"a\x00b"]), FORMERR),
    (packet(["bücher".encode(), b"de"]), FORMERR),  # raw UTF-8, not IDNA
    (packet([b"a/b"]), FORMERR),
])
def test_malformed_queries_give_the_exact_rcode(data: bytes, rcode: int) -> None:
    assert rcode_of(data) == rcode


def test_extended_label_types_are_refused() -> None:
    for prefix in (0x40, 0x41, 0x80, 0xBF):
        assert rcode_of(struct.pack(">6H", 1, RD, 1, 0, 0, 0) + bytes([prefix]) + b"x" * 70) == FORMERR


def test_header_id() -> None:
    assert header_id(b"") is None and header_id(b"\x12") is None
    assert header_id(b"\x12\x34") == 0x1234 and header_id(packet(ident=0xBEEF)) == 0xBEEF


# --- answers, read back by dnspython ------------------------------------------------------------------------

def test_a_answer_layout() -> None:
    data = packet("Api.Example.com", counts=(1, 0, 0, 1), tail=OPT)
    answer = answer_a(parse_query(data), ipaddress.IPv4Address("198.18.0.7"), 5)
    question = data[12:-len(OPT)]
    # QR AA RD, NOERROR; 1 question 1 answer; the question as sent (case kept); the record's owner a pointer
    assert answer == (struct.pack(">6H", 0x1234, 0x8000 | 0x0400 | RD, 1, 1, 0, 0) + question
                      + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + bytes([198, 18, 0, 7]))


def test_a_answer_read_by_dnspython() -> None:
    data = packet("api.example.com", ident=4242)
    message = dns.message.from_wire(answer_a(parse_query(data), ipaddress.IPv4Address("198.18.1.2"), 30))
    assert message.id == 4242 and message.rcode() == dns.rcode.NOERROR
    assert message.flags & dns.flags.QR and message.flags & dns.flags.AA and message.flags & dns.flags.RD
    assert not message.flags & dns.flags.RA and not message.flags & dns.flags.TC
    assert [(q.name.to_text(), q.rdtype, q.rdclass) for q in message.question] == [
        ("api.example.com.", dns.rdatatype.A, dns.rdataclass.IN)]
    [rrset] = message.answer
    assert rrset.name.to_text() == "api.example.com." and rrset.rdtype == dns.rdatatype.A and rrset.ttl == 30
    assert [rdata.to_text() for rdata in rrset] == ["198.18.1.2"]
    assert dns.message.from_wire(data).is_response(message)


def test_rd_and_cd_are_copied_and_nothing_else() -> None:
    query = parse_query(packet(flags=0x0010 | 0x0020 | 0x0040 | 0x000F))  # CD, AD, Z, a stray RCODE
    flags = struct.unpack(">H", answer_empty(query)[2:4])[0]
    assert flags == 0x8000 | 0x0400 | 0x0010


def test_a_answer_refuses_questions_it_does_not_answer() -> None:
    address = ipaddress.IPv4Address("198.18.0.1")
    for query in (parse_query(packet(qtype=TYPE_AAAA)), parse_query(packet(qclass=3))):
        with pytest.raises(ValueError, match="does not answer"):
            answer_a(query, address, 5)
    for ttl in (-1, 1 << 31):
        with pytest.raises(ValueError, match="TTL"):
            answer_a(parse_query(packet()), address, ttl)
    assert dns.message.from_wire(answer_a(parse_query(packet(qtype=255)), address, 0)).answer[0].ttl == 0


def test_empty_answer_for_aaaa() -> None:
    data = packet("example.com", TYPE_AAAA)
    message = dns.message.from_wire(answer_empty(parse_query(data)))
    assert message.rcode() == dns.rcode.NOERROR and message.answer == [] and message.flags & dns.flags.AA
    assert message.question[0].rdtype == dns.rdatatype.AAAA
    assert dns.message.from_wire(data).is_response(message)


@pytest.mark.parametrize("rcode", [NXDOMAIN, FORMERR, NOTIMP, REFUSED, SERVFAIL])
def test_error_answer_echoes_the_question(rcode: int) -> None:
    data = packet("denied.example.com", ident=77, counts=(1, 0, 0, 1), tail=OPT)
    answer = answer_error(data, rcode)
    assert answer is not None
    message = dns.message.from_wire(answer)
    assert message.id == 77 and message.rcode() == rcode and message.flags & dns.flags.RD
    assert bool(message.flags & dns.flags.AA) == (rcode == NXDOMAIN)
    assert message.question[0].name.to_text() == "denied.example.com." and message.answer == []
    assert dns.message.from_wire(data).is_response(message)


@pytest.mark.parametrize("data", [
    b"\xab\xcd",
    b"\xab\xcd\x01",
    packet(ident=0xABCD)[:11],
    packet(ident=0xABCD, counts=(2, 0, 0, 0)),
    packet([b"bad name"], ident=0xABCD),
    packet(ident=0xABCD)[:-1],
])
def test_error_answer_is_header_only_when_the_question_cannot_be_read(data: bytes) -> None:
    answer = answer_error(data, FORMERR)
    assert answer is not None and len(answer) == 12
    message = dns.message.from_wire(answer)
    assert message.id == 0xABCD and message.rcode() == FORMERR and message.question == []


def test_not_implemented_opcode_is_echoed_without_the_question() -> None:
    data = packet(ident=9, flags=5 << 11)  # an UPDATE: its "question" is a zone, not ours to interpret
    assert rcode_of(data) == NOTIMP
    answer = answer_error(data, NOTIMP)
    assert answer is not None
    message = dns.message.from_wire(answer)
    assert message.opcode() == dns.opcode.UPDATE and message.rcode() == NOTIMP and message.id == 9


def test_nothing_is_sent_without_an_id_or_to_a_response() -> None:
    assert answer_error(b"", FORMERR) is None and answer_error(b"\x01", FORMERR) is None
    assert answer_error(packet(flags=0x8000), FORMERR) is None
    assert answer_error(b"\x00\x01\x80", FORMERR) is None
    with pytest.raises(ValueError):
        answer_error(packet(), 0)
    with pytest.raises(ValueError):
        answer_error(packet(), 16)


# --- dnspython as the client: its queries, our parser --------------------------------------------------------

LDH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


def _fit(labels: list[str]) -> list[str]:
    """Drop labels from the end until the name fits in 255 wire bytes (one label always does)."""
    while sum(len(label) + 1 for label in labels) + 1 > 255:
        labels = labels[:-1]
    return labels


names = st.lists(st.text(LDH, min_size=1, max_size=63), min_size=1, max_size=6).map(_fit).map(".".join)


@given(names, st.sampled_from(["A", "AAAA", "MX", "TXT", "HTTPS", "ANY"]), st.booleans())
def test_dnspython_queries_parse_to_the_same_question(name: str, rdtype: str, edns: bool) -> None:
    made = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
    query = parse_query(made.to_wire())
    assert query.id == made.id and query.flags == made.flags
    assert query.question == Question(name.lower(), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)


@given(names, st.integers(0, 65535), st.integers(0, (1 << 31) - 1), st.integers(0, (1 << 32) - 1))
def test_answers_are_responses_to_the_query_for_dnspython(name: str, ident: int, ttl: int, address: int) -> None:
    made = dns.message.make_query(name, "A", use_edns=0)
    made.id = ident
    query = parse_query(made.to_wire())
    a = dns.message.from_wire(answer_a(query, ipaddress.IPv4Address(address), ttl))
    assert made.is_response(a) and a.rcode() == dns.rcode.NOERROR
    assert a.answer[0].name == made.question[0].name and a.answer[0].ttl == ttl
    assert [rdata.to_text() for rdata in a.answer[0]] == [str(ipaddress.IPv4Address(address))]
    empty = dns.message.from_wire(answer_empty(query))
    assert made.is_response(empty) and empty.answer == []
    error = answer_error(made.to_wire(), NXDOMAIN)
    assert error is not None
    nx = dns.message.from_wire(error)
    assert made.is_response(nx) and nx.rcode() == dns.rcode.NXDOMAIN


# --- fuzzing --------------------------------------------------------------------------------------------------

def _check_any(data: bytes) -> None:
    """The whole contract for hostile input: a Query or DnsError from the parser, and an error answer that is
    nothing or a message dnspython reads, with our ID and RCODE."""
    try:
        query = parse_query(data)
    except DnsError as e:
        assert e.rcode in (FORMERR, NOTIMP)
    else:
        assert query.raw_question == data[12:12 + len(query.raw_question)]
        assert len(query.question.name) <= 253
    for rcode in (FORMERR, NXDOMAIN):
        answer = answer_error(data, rcode)
        if answer is None:
            assert len(data) < 2 or data[2] & 0x80
        else:
            message = dns.message.from_wire(answer)
            assert message.id == header_id(data) and message.rcode() == rcode


@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    _check_any(data)


@given(st.binary(min_size=12, max_size=12), st.binary(max_size=300))
def test_arbitrary_bytes_behind_a_plausible_header(header: bytes, body: bytes) -> None:
    # QR=0, opcode 0, QDCOUNT 1: gets past the header checks so the name parser is what is exercised
    _check_any(header[:2] + bytes([header[2] & 0x07, header[3]]) + b"\x00\x01" + header[6:] + body)


mutations = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "set"]), st.integers(0, 400),
                               st.integers(0, 255)), min_size=1, max_size=6)


@given(names, st.sampled_from(["A", "AAAA", "ANY"]), st.booleans(), mutations)
def test_mutated_queries(name: str, rdtype: str, edns: bool, edits: list[tuple[str, int, int]]) -> None:
    data = bytearray(dns.message.make_query(name, rdtype, use_edns=0 if edns else False).to_wire())
    for kind, position, value in edits:
        at = position % (len(data) + 1)
        if kind == "insert":
            data[at:at] = bytes([value])
        elif data and at < len(data):
            if kind == "flip":
                data[at] ^= 1 << (value % 8)
            elif kind == "set":
                data[at] = value
            else:
                del data[at]
    _check_any(bytes(data))


# --- the address book -----------------------------------------------------------------------------------------

def test_default_book_uses_the_benchmarking_range() -> None:
    book = AddressBook()
    assert book.network == ipaddress.IPv4Network("198.18.0.0/15") and book.capacity == 4096
    assert book.address_for("a.example") == ipaddress.IPv4Address("198.18.0.1")  # never the network address
    assert book.name_for(ipaddress.IPv4Address("198.18.0.1")) == "a.example"
    assert book.name_for(ipaddress.IPv4Address("198.18.0.2")) is None
    assert book.name_for(ipaddress.IPv4Address("10.0.0.1")) is None


def test_stable_and_unique() -> None:
    book = AddressBook("10.9.0.0/24")
    first = {name: book.address_for(name) for name in ("a", "b", "c")}
    assert len(set(first.values())) == 3 and all(book.address_for(n) == a for n, a in first.items())
    assert {book.name_for(a) for a in first.values()} == {"a", "b", "c"} and len(book) == 3


def test_eviction_is_least_recently_used_and_reuses_the_address() -> None:
    book = AddressBook("10.0.0.0/24", capacity=3)
    a, b, c = (book.address_for(n) for n in ("a", "b", "c"))
    book.address_for("a")  # a resolved again: b is now the oldest
    d = book.address_for("d")
    assert d == b and book.name_for(b) == "d" and len(book) == 3
    assert book.name_for(c) == "c"  # a connection to c counts as use: a is now the oldest
    e = book.address_for("e")
    assert e == a and book.name_for(a) == "e"
    assert book.address_for("b") == d and book.name_for(c) == "c"  # b is new again and evicts the oldest, d


def test_capacity_one() -> None:
    book = AddressBook("10.0.0.0/30", capacity=1)
    x = book.address_for("x")
    assert book.address_for("x") == x
    assert book.address_for("y") == x and book.name_for(x) == "y" and len(book) == 1


def test_whole_network_is_usable_but_not_its_ends() -> None:
    book = AddressBook("10.0.0.0/29")  # default capacity shrinks to the 6 usable addresses
    assert book.capacity == 6
    addresses = {book.address_for(str(i)) for i in range(6)}
    assert addresses == set(ipaddress.IPv4Network("10.0.0.0/29").hosts())
    assert book.address_for("7") in addresses


@pytest.mark.parametrize(("network", "capacity"), [("10.0.0.0/31", None), ("10.0.0.0/32", None),
                                                   ("10.0.0.0/30", 3), ("10.0.0.0/24", 0)])
def test_bad_book_settings(network: str, capacity: int | None) -> None:
    with pytest.raises(ValueError):
        AddressBook(network, capacity)


class BookAgainstModel(RuleBasedStateMachine):
    """The book against the most obvious LRU: a dict and a recency list, addresses handed out in order."""

    network = ipaddress.IPv4Network("10.1.0.0/28")  # 14 usable addresses

    def __init__(self) -> None:
        super().__init__()
        self.book = AddressBook(self.network, capacity=1)
        self.model: dict[str, ipaddress.IPv4Address] = {}
        self.recency: list[str] = []  # oldest first
        self.handed_out = 0

    @initialize(capacity=st.integers(1, 14))
    def start(self, capacity: int) -> None:
        self.book = AddressBook(self.network, capacity=capacity)

    def _use(self, name: str) -> None:
        self.recency.remove(name)
        self.recency.append(name)

    @rule(name=st.sampled_from("abcdefghijklmnopqrst"))
    def resolve(self, name: str) -> None:
        if name in self.model:
            self._use(name)
            expected = self.model[name]
        elif len(self.model) < self.book.capacity:
            self.handed_out += 1
            expected = self.network.network_address + self.handed_out
            self.model[name] = expected
            self.recency.append(name)
        else:
            oldest = self.recency.pop(0)
            expected = self.model.pop(oldest)
            self.model[name] = expected
            self.recency.append(name)
        assert self.book.address_for(name) == expected

    @rule(offset=st.integers(-1, 17))
    def connect(self, offset: int) -> None:
        address = self.network.network_address + offset
        owner = next((n for n, a in self.model.items() if a == address), None)
        if owner is not None:
            self._use(owner)
        assert self.book.name_for(address) == owner

    @invariant()
    def consistent(self) -> None:
        assert len(self.book) == len(self.model) <= self.book.capacity
        assert len(set(self.model.values())) == len(self.model)
        assert all(a in self.network and a not in (self.network.network_address, self.network.broadcast_address)
                   for a in self.model.values())


TestBookAgainstModel = BookAgainstModel.TestCase

"""Properties of the egress engine, each checked against an independent oracle (string or
`ipaddress` logic written here), beside the worked examples in test_egress_cases.py."""

from __future__ import annotations

import ipaddress

from hypothesis import assume, given
from hypothesis import strategies as st

from enclaver_rules.policy import EgressPolicy, PolicyError, parse_destination, parse_rule

label = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]|[a-z]", fullmatch=True)
labels = st.lists(label, min_size=1, max_size=5)


def name(parts: list[str]) -> str:
    return ".".join(parts)


def allowed(allow: list[str], dest: str, deny: list[str] = ()) -> bool:  # type: ignore[assignment]
    return EgressPolicy.from_lists(allow, deny).decide(dest).allowed


@given(labels, labels)
def test_literal_pattern_matches_only_the_same_name(pattern: list[str], host: list[str]) -> None:
    assert allowed([name(pattern)], name(host)) == (pattern == host)


@given(labels, st.sampled_from(["", "."]), st.booleans())
def test_case_and_one_trailing_dot_do_not_matter(host: list[str], dot: str, upper: bool) -> None:
    text = name(host) + dot
    assert allowed([name(host)], text.upper() if upper else text)


@given(labels, labels)
def test_star_matches_exactly_one_label(suffix: list[str], host: list[str]) -> None:
    expected = len(host) == len(suffix) + 1 and host[1:] == suffix
    assert allowed(["*." + name(suffix)], name(host)) == expected


@given(labels, labels)
def test_double_star_matches_one_or_more_labels(suffix: list[str], host: list[str]) -> None:
    expected = len(host) > len(suffix) and host[len(host) - len(suffix):] == suffix
    assert allowed(["**." + name(suffix)], name(host)) == expected


@given(labels, labels, labels)
def test_labels_left_of_double_star_must_match(prefix: list[str], suffix: list[str], host: list[str]) -> None:
    expected = (len(host) > len(prefix) + len(suffix) and host[: len(prefix)] == prefix
                and host[len(host) - len(suffix):] == suffix)
    assert allowed([name(prefix) + ".**." + name(suffix)], name(host)) == expected


@given(st.lists(labels, min_size=1, max_size=3), st.lists(labels, min_size=1, max_size=3), labels)
def test_deny_wins_and_nothing_is_allowed_by_default(allow: list[list[str]], deny: list[list[str]], host: list[str]) -> None:
    a, d = [name(p) for p in allow], [name(p) for p in deny]
    decision = EgressPolicy.from_lists(a, d).decide(name(host))
    assert decision.allowed == (name(host) in a and name(host) not in d)
    assert not EgressPolicy.from_lists([], d).decide(name(host)).allowed


# Special addresses, classified here with `ipaddress`'s own flags (most specific first), each with the
# range a rule must lie inside to name it. Oracle for the engine's table in `special_range`.
V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network
ORACLE_V4: list[tuple[object, V4]] = [
    (lambda a: a.is_unspecified, V4("0.0.0.0/32")),
    (lambda a: int(a) >> 24 == 0, V4("0.0.0.0/8")),
    (lambda a: a.is_loopback, V4("127.0.0.0/8")),
    (lambda a: a.is_link_local, V4("169.254.0.0/16")),
    (lambda a: a.is_multicast, V4("224.0.0.0/4")),
    (lambda a: int(a) == 0xFFFFFFFF, V4("255.255.255.255/32")),
]
ORACLE_V6: list[tuple[object, V6]] = [
    (lambda a: a.is_unspecified, V6("::/128")),
    (lambda a: a.is_loopback, V6("::1/128")),
    (lambda a: int(a) >> 32 == 0, V6("::/96")),
    (lambda a: a.is_link_local, V6("fe80::/10")),
    (lambda a: int(a) >> 96 == 0xFD000EC2, V6("fd00:ec2::/32")),
    (lambda a: a.is_multicast, V6("ff00::/8")),
]
EMBEDDING = [V6("::ffff:0:0/96"), V6("::ffff:0:0:0/96"), V6("64:ff9b::/96")]


def special_oracle(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> V4 | V6 | None:
    """The range a rule must lie inside to name `addr`, or None when `addr` is ordinary."""
    if addr.version == 6:
        for prefix in EMBEDDING:
            if addr in prefix:
                inner = special_oracle(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
                if inner is None:
                    return None
                return V6(f"{ipaddress.IPv6Address(int(prefix.network_address) + int(inner.network_address))}"
                          f"/{96 + inner.prefixlen}")
    for holds, network in (ORACLE_V4 if addr.version == 4 else ORACLE_V6):
        if holds(addr):  # type: ignore[operator]
            return network
    return None


def allowed_by_cidr(network: V4 | V6, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    special = special_oracle(addr)
    return addr in network and (special is None or network.subnet_of(special))  # type: ignore[arg-type]


@given(st.ip_addresses(v=4), st.integers(0, 32), st.ip_addresses(v=4))
def test_ipv4_cidr_is_containment_and_special_addresses_need_naming(
        base: ipaddress.IPv4Address, prefix: int, addr: ipaddress.IPv4Address) -> None:
    network = ipaddress.IPv4Network(f"{base}/{prefix}", strict=False)
    assert allowed([f"{base}/{prefix}"], str(addr)) == allowed_by_cidr(network, addr)


@given(st.ip_addresses(v=6), st.integers(0, 128), st.ip_addresses(v=6))
def test_ipv6_cidr_is_containment_and_special_addresses_need_naming(
        base: ipaddress.IPv6Address, prefix: int, addr: ipaddress.IPv6Address) -> None:
    assume(addr.ipv4_mapped is None)
    network = ipaddress.IPv6Network(f"{base}/{prefix}", strict=False)
    assume(network.network_address.ipv4_mapped is None or prefix < 96)
    assert allowed([f"[{base}]/{prefix}"], f"[{addr}]:443") == allowed_by_cidr(network, addr)


@given(st.ip_addresses())
def test_an_everything_rule_never_reaches_a_special_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    target = addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr
    dest = f"[{addr}]:80" if addr.version == 6 else f"{addr}:80"
    assert allowed(["0.0.0.0/0", "::/0"], dest) == (special_oracle(target) is None)
    assert allowed([str(target)], dest)  # naming the address itself always allows it


@given(st.ip_addresses(v=4), st.integers(8, 32))
def test_mapped_ipv6_is_judged_as_its_ipv4(addr: ipaddress.IPv4Address, prefix: int) -> None:
    rule = str(ipaddress.IPv4Network(f"{addr}/{prefix}", strict=False))
    mapped = f"::ffff:{addr}"
    assert allowed([rule], mapped) == allowed([rule], str(addr)) == allowed_by_cidr(V4(rule), addr)
    assert not allowed(["::/0"], mapped, deny=[rule])


@given(labels, st.ip_addresses(), st.lists(st.sampled_from(
    ["0.0.0.0/0", "::/0", "127.0.0.0/8", "127.0.0.1", "169.254.169.254", "0.0.0.0", "::1", "fd00:ec2::254",
     "10.0.0.0/8", "64:ff9b::/96"]), max_size=4), st.lists(st.sampled_from(["10.0.0.0/8", "127.0.0.2", "::/0"]),
                                                            max_size=2))
def test_a_resolved_address_is_judged_as_if_dialled(host: list[str], addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                     ip_allow: list[str], ip_deny: list[str]) -> None:
    """DNS rebinding: an allowed name reaches an address only if dialling that address needs no
    naming rule the policy lacks, and no deny rule covers it."""
    policy = EgressPolicy.from_lists(["**", *ip_allow], ip_deny)
    target = addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr
    special = special_oracle(target)
    nets = [ipaddress.ip_network(r) for r in ip_allow]
    named = special is None or any(n.version == target.version and target in n and n.subnet_of(special)  # type: ignore[arg-type]
                                   for n in nets)
    denied = any(ipaddress.ip_network(r).version == target.version and target in ipaddress.ip_network(r)
                 for r in ip_deny)
    decision = policy.decide_resolved(name(host), addr)
    assert decision.allowed == (named and not denied and name(host) != "host")


@given(st.ip_addresses(v=4), labels)
def test_names_and_addresses_never_meet(addr: ipaddress.IPv4Address, host: list[str]) -> None:
    assert not allowed(["**"], str(addr))
    assert not allowed(["0.0.0.0/0"], name(host))


@given(st.text(max_size=40))
def test_rules_parse_or_raise_our_error(text: str) -> None:
    try:
        parse_rule(text)
    except PolicyError as e:
        assert e.message and e.fix


@given(st.text(max_size=40))
def test_destinations_parse_or_raise_our_error(text: str) -> None:
    try:
        dest = parse_destination(text)
    except PolicyError as e:
        assert e.message and e.fix
    else:
        assert dest.host == dest.host.lower().strip()


@given(st.text(alphabet="abc.*-019:[]/", max_size=30), st.text(alphabet="abc.-019:[]", max_size=30))
def test_decisions_never_crash_on_near_miss_syntax(rule: str, dest: str) -> None:
    try:
        policy = EgressPolicy.from_lists([rule])
        policy.decide(dest)
    except PolicyError:
        pass

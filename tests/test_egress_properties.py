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


@given(st.ip_addresses(v=4), st.integers(0, 32), st.ip_addresses(v=4))
def test_ipv4_cidr_is_plain_containment(base: ipaddress.IPv4Address, prefix: int, addr: ipaddress.IPv4Address) -> None:
    network = ipaddress.IPv4Network(f"{base}/{prefix}", strict=False)
    assert allowed([f"{base}/{prefix}"], str(addr)) == (addr in network)


@given(st.ip_addresses(v=6), st.integers(0, 128), st.ip_addresses(v=6))
def test_ipv6_cidr_is_plain_containment(base: ipaddress.IPv6Address, prefix: int, addr: ipaddress.IPv6Address) -> None:
    assume(addr.ipv4_mapped is None)
    network = ipaddress.IPv6Network(f"{base}/{prefix}", strict=False)
    assume(network.network_address.ipv4_mapped is None or prefix < 96)
    assert allowed([f"[{base}]/{prefix}"], f"[{addr}]:443") == (addr in network)


@given(st.ip_addresses(v=4), st.integers(8, 32))
def test_mapped_ipv6_is_judged_as_its_ipv4(addr: ipaddress.IPv4Address, prefix: int) -> None:
    rule = str(ipaddress.IPv4Network(f"{addr}/{prefix}", strict=False))
    mapped = f"::ffff:{addr}"
    assert allowed([rule], mapped)
    assert not allowed(["::/0"], mapped, deny=[rule])


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

"""`enclaver egress test` against the reference semantics (../shared/reference/enclaver-compat.md §2).

Each case is worked out from the notes, not from our output: upstream's unit-test patterns
(`example.com`, `*.com`, `foo.*.com`, `**.amazonaws.com`; IP rules `66.254.33.22`, `/32`, `0.0.0.0/0`,
`66.254.33.22/24`, `::/0`), the classification rules (an IP is checked against IP rules only, a name
against name rules only; deny wins; default deny), and the quirks where we are strict on purpose.
`upstream` records upstream's answer where it differs from ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Case:
    allow: tuple[str, ...]
    dest: str
    allowed: bool
    rule: str | None = None  # the rule that decides (None: the default deny)
    deny: tuple[str, ...] = ()
    upstream: bool | None = None  # upstream's answer, when it differs
    special: str | None = None  # the kind of special address the decision is about

    def __str__(self) -> str:
        return f"{'+' if self.allowed else '-'}{self.dest} allow={list(self.allow)} deny={list(self.deny)}"


C = Case
CASES = [
    # `example.com`: exact, case-insensitive; no subdomains
    C(("example.com",), "example.com", True, "example.com"),
    C(("example.com",), "EXAMPLE.Com", True, "example.com"),
    C(("example.com",), "example.com:443", True, "example.com"),  # no port component: ports never checked
    C(("example.com",), "a.example.com", False),
    C(("example.com",), "example.org", False),
    C(("example.com",), "example.com.", True, "example.com", upstream=False),  # one trailing dot ignored
    C(("example.com.",), "example.com", True, "example.com.", upstream=False),
    # `*.com`: exactly one label in front of `com`
    C(("*.com",), "example.com", True, "*.com"),
    C(("*.com",), "a.b.com", False),
    C(("*.com",), "com", False),
    # `foo.*.com`
    C(("foo.*.com",), "foo.bar.com", True, "foo.*.com"),
    C(("foo.*.com",), "foo.com", False),
    C(("foo.*.com",), "foo.a.b.com", False),
    C(("foo.*.com",), "bar.baz.com", False),
    C(("*.example.com",), "_dmarc.example.com", True, "*.example.com"),  # `*` takes any label content
    # `**.amazonaws.com`: one or more labels
    C(("**.amazonaws.com",), "kms.us-east-1.amazonaws.com", True, "**.amazonaws.com"),
    C(("**.amazonaws.com",), "s3.amazonaws.com", True, "**.amazonaws.com"),
    C(("**.amazonaws.com",), "amazonaws.com", False),
    C(("**.amazonaws.com",), "amazonaws.com.evil.com", False),
    C(("**.amazonaws.com",), "notamazonaws.com", False),
    # `**` in the middle: labels left of it must still match (upstream stops looking at `**`)
    C(("foo.**.com",), "foo.a.com", True, "foo.**.com"),
    C(("foo.**.com",), "foo.a.b.com", True, "foo.**.com"),
    C(("foo.**.com",), "bar.example.com", False, upstream=True),
    C(("foo.**.com",), "foo.com", False),
    C(("kms.*.amazonaws.com",), "kms.eu-west-1.amazonaws.com", True, "kms.*.amazonaws.com"),
    C(("kms.*.amazonaws.com",), "kms.amazonaws.com", False),
    # IP rules: exact, /32, CIDR (host bits ignored), everything, IPv6
    C(("66.254.33.22",), "66.254.33.22", True, "66.254.33.22"),
    C(("66.254.33.22",), "66.254.33.23", False),
    C(("66.254.33.22/32",), "66.254.33.22:8080", True, "66.254.33.22/32"),
    C(("66.254.33.22/24",), "66.254.33.1", True, "66.254.33.22/24"),
    C(("66.254.33.22/24",), "66.254.33.255", True, "66.254.33.22/24"),
    C(("66.254.33.22/24",), "66.254.34.1", False),
    C(("0.0.0.0/0",), "8.8.8.8", True, "0.0.0.0/0"),
    C(("0.0.0.0/0",), "::1", False),  # families never match each other
    C(("::/0",), "2001:db8::1", True, "::/0"),
    C(("::/0",), "[::1]:443", False, upstream=True, special="loopback"),  # special: see below
    C(("::/0",), "1.2.3.4", False),
    C(("10.0.0.0/255.0.0.0",), "10.9.9.9", True, "10.0.0.0/255.0.0.0"),  # dotted netmask
    # bracketed IPv6 entries are IP rules (upstream treats `[::1]` as a name that never matches)
    C(("[::1]",), "::1", True, "[::1]", upstream=False, special="loopback"),
    C(("[::1]",), "[::1]:8200", True, "[::1]", upstream=False, special="loopback"),
    # an IP destination meets IP rules only; a name meets name rules only
    C(("**",), "8.8.8.8", False),
    C(("0.0.0.0/0",), "example.com", False),
    C(("**",), "anything.example", True, "**"),
    # IPv4-mapped IPv6 is checked as the IPv4 address it carries (upstream: never matches IPv4 rules)
    C(("10.0.0.0/8",), "[::ffff:10.1.2.3]:80", True, "10.0.0.0/8", upstream=False),
    C(("::/0",), "::ffff:10.0.0.1", False, "10.0.0.0/8", deny=("10.0.0.0/8",), upstream=True),
    # deny wins; default deny
    C(("**.amazonaws.com",), "s3.amazonaws.com", False, "s3.amazonaws.com", deny=("s3.amazonaws.com",)),
    C(("**.amazonaws.com",), "kms.us-east-1.amazonaws.com", True, "**.amazonaws.com", deny=("s3.amazonaws.com",)),
    C(("10.0.0.0/8",), "10.6.6.6", False, "10.6.0.0/16", deny=("10.6.0.0/16",)),
    C(("10.0.0.0/8",), "10.7.6.6", True, "10.0.0.0/8", deny=("10.6.0.0/16",)),
    C((), "example.com", False),
    # the name `host` is an ordinary label to the policy; it and 127.0.0.1 do not imply each other
    C(("host",), "host", True, "host"),
    C(("host",), "HOST:5432", True, "host"),
    C(("host",), "127.0.0.1", False),
    C(("127.0.0.1",), "host", False),
    C(("*",), "host", False, upstream=True),  # only the literal rule `host` allows the parent
    C(("**",), "host", False, upstream=True),
    C(("*", "host"), "host", True, "host"),
    C(("**",), "localhost", True, "**"),  # a name like any other here; the host side vets its addresses
    # special addresses (loopback, unspecified, link-local, ...) need an allow rule that names them:
    # one lying wholly inside their range. A wider rule that merely contains them does not do.
    C(("0.0.0.0/0",), "0.0.0.0:22", False, upstream=True, special="unspecified"),
    C(("::/0",), "[::]:22", False, upstream=True, special="unspecified"),
    C(("0.0.0.0/8",), "0.0.0.0", False, special="unspecified"),  # 0.0.0.0 is its own range: name it
    C(("0.0.0.0",), "0.0.0.0", True, "0.0.0.0", special="unspecified"),
    C(("0.0.0.0/0",), "0.1.2.3", False, upstream=True, special="this-network"),
    C(("0.0.0.0/0",), "127.0.0.2", False, upstream=True, special="loopback"),
    C(("0.0.0.0/1",), "127.0.0.1:5432", False, upstream=True, special="loopback"),
    C(("0.0.0.0/0",), "[::ffff:127.0.0.1]:80", False, special="loopback"),
    C(("127.0.0.0/8",), "[::ffff:127.0.0.1]:80", True, "127.0.0.0/8", upstream=False, special="loopback"),
    C(("127.0.0.0/8",), "127.0.0.2", True, "127.0.0.0/8", special="loopback"),
    C(("127.0.0.1",), "127.0.0.2", False),
    C(("0.0.0.0/0",), "169.254.169.254", False, upstream=True, special="link-local"),
    C(("169.254.169.254",), "169.254.169.254:80", True, "169.254.169.254", special="link-local"),
    C(("169.254.0.0/16",), "169.254.169.254", True, "169.254.0.0/16", special="link-local"),
    C(("0.0.0.0/0",), "169.254.169.254", False, "169.254.169.254", deny=("169.254.169.254",)),  # deny still wins
    C(("::/0",), "[fd00:ec2::254]:80", False, upstream=True, special="link-local"),
    C(("fd00:ec2::254",), "[fd00:ec2::254]:80", True, "fd00:ec2::254", special="link-local"),
    C(("::/0",), "fe80::1", False, upstream=True, special="link-local"),
    C(("::/0",), "64:ff9b::7f00:1", False, upstream=True, special="loopback"),  # NAT64 of 127.0.0.1
    C(("::/0",), "::7f00:1", False, upstream=True, special="ipv4-compatible"),
    C(("0.0.0.0/0",), "224.0.0.1", False, upstream=True, special="multicast"),
    C(("0.0.0.0/0",), "255.255.255.255", False, upstream=True, special="broadcast"),
    C(("0.0.0.0/0",), "10.0.0.1", True, "0.0.0.0/0"),  # ordinary addresses are unaffected
    # a four-entry filter as in upstream's test_domain_filter
    C(("example.com", "*.example.org", "**.example.net", "10.0.0.0/8"), "a.b.example.net", True, "**.example.net"),
    C(("example.com", "*.example.org", "**.example.net", "10.0.0.0/8"), "a.b.example.org", False),
    C(("example.com", "*.example.org", "**.example.net", "10.0.0.0/8"), "www.example.com", False),
]


def _args(case: Case) -> list[str]:
    args = ["egress", "test", "--json"]
    for rule in case.allow:
        args += ["--allow", rule]
    for rule in case.deny:
        args += ["--deny", rule]
    if not case.allow and not case.deny:
        args += ["-f", "enclaver.yaml"]
    return args + [case.dest]


def test_there_are_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert sum(c.upstream is not None for c in CASES) >= 5  # every documented strictness is exercised


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(case: Case, cli, in_tmp) -> None:
    # the empty policy comes from a manifest without egress (--allow/--deny need at least one rule)
    (in_tmp / "enclaver.yaml").write_text('version: v1\nname: x\ntarget: t\nsources: {app: a}\n')
    result = cli(*_args(case))
    assert result.code == (0 if case.allowed else 1), result.stderr
    [decision] = result.json()["results"]
    assert decision["allowed"] is case.allowed
    assert decision["rule"] == case.rule
    assert decision["list"] == (None if case.rule is None else "allow" if case.allowed else "deny")
    assert decision["special"] == case.special


def test_a_special_denial_says_what_the_address_is_and_how_to_allow_it(cli) -> None:
    result = cli("egress", "test", "--allow", "0.0.0.0/0", "127.0.0.1:8080")
    assert result.code == 1
    assert result.lines == [
        "denied   127.0.0.1:8080  127.0.0.1 is a loopback address (the parent instance's own services): allow rule "
        "'0.0.0.0/0' contains it but does not name it; only an allow rule that names it allows it, e.g. '127.0.0.1'; "
        "for the parent's services use 'host'"]


def test_people_output_names_verdict_and_rule(cli) -> None:
    result = cli("egress", "test", "--allow", "kms.*.amazonaws.com", "--allow", "host",
                 "kms.us-east-1.amazonaws.com:443", "evil.example", "host")
    assert result.code == 1
    assert result.lines == [
        "allowed  kms.us-east-1.amazonaws.com:443  allowed by allow rule 'kms.*.amazonaws.com'",
        "denied   evil.example                     no allow rule matches (default deny)",
        "allowed  host                             allowed by allow rule 'host'  [the parent instance]",
    ]


def test_all_allowed_exits_0(cli) -> None:
    assert cli("egress", "test", "--allow", "**.example.com", "a.example.com", "b.c.example.com").code == 0


@pytest.mark.parametrize("dest, message", [
    ("x.com:99999", "DEST: 'x.com:99999': '99999' is not a port — give a port from 1 to 65535"),
    ("010.0.0.1", "DEST: '010.0.0.1' is neither a host name nor a canonical IP address"),
    ("0x7f.1", "DEST: '0x7f.1' is neither a host name nor a canonical IP address"),
    ("2130706433", "DEST: '2130706433' is neither a host name nor a canonical IP address"),
    ("2001:db8::1:443x", "DEST: '2001:db8::1:443x' is not a valid IPv6 address"),
    ("[::1", "DEST: '[::1' has an unbalanced bracket"),
    ("https://example.com/", "DEST: 'https://example.com/' is not a host"),
    (".example.com", "DEST: '.example.com' is not a valid host name"),
    ("fe80::1%eth0", "DEST: 'fe80::1%eth0' has a zone identifier"),
])
def test_bad_destination_exits_2_and_tests_nothing(cli, dest: str, message: str) -> None:
    result = cli("egress", "test", "--allow", "**", "ok.example.com", dest)
    assert result.code == 2
    assert result.stdout == ""
    assert message in result.stderr


def test_invalid_rule_exits_2(cli) -> None:
    result = cli("egress", "test", "--allow", "*.*", "example.com")
    assert result.code == 2
    assert ("--allow: allow[0]: '*.*' is not a valid allow pattern: a wildcard top-level label matches every "
            "domain — name the domain, e.g. '**.example.com'") in result.stderr


def test_manifest_policy_is_used(cli, in_tmp) -> None:
    (in_tmp / "enclaver.yaml").write_text(
        "version: v1\nname: x\ntarget: t\nsources: {app: a}\n"
        "egress:\n  allow: [\"**.example.com\", 10.0.0.0/8]\n  deny: [bad.example.com]\n")
    result = cli("egress", "test", "--json", "good.example.com", "bad.example.com", "10.1.1.1", "11.1.1.1")
    assert result.code == 1
    doc = result.json()
    assert doc["policy"] == "enclaver.yaml"
    assert [r["allowed"] for r in doc["results"]] == [True, False, True, False]
    assert doc["results"][1]["reason"] == "denied by deny rule 'bad.example.com' (deny wins over allow rule '**.example.com')"


def test_egress_off_says_so(cli, in_tmp) -> None:
    (in_tmp / "enclaver.yaml").write_text("version: v1\nname: x\ntarget: t\nsources: {app: a}\n")
    result = cli("egress", "test", "--json", "example.com")
    assert result.json()["results"][0]["reason"] == "egress is off: there are no allow rules (default deny)"
    assert result.json()["enabled"] is False


def test_invalid_manifest_exits_2(cli, in_tmp) -> None:
    (in_tmp / "enclaver.yaml").write_text(
        "version: v1\nname: x\ntarget: t\nsources: {app: a}\negress:\n  allow: [\"api-*.example.com\"]\n")
    result = cli("egress", "test", "api-1.example.com")
    assert result.code == 2
    assert "enclaver.yaml:6:11: egress.allow[0]: 'api-*.example.com' has a partial wildcard" in result.stderr

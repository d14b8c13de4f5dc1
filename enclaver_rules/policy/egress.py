"""Egress policy: which destinations an enclave may reach. Pure: no I/O, no DNS, no clock.

Semantics (upstream enclaver's where sound, strict where upstream is loose — see README):

* An entry is an **IP rule** (an IPv4/IPv6 address, bracketed or not, or a CIDR network; an IPv4
  dotted netmask such as ``10.0.0.0/255.0.0.0`` is accepted) or else a **name pattern**.
* Names compare case-insensitively; one trailing dot is ignored on both sides.
* In a pattern, ``*`` matches exactly one non-empty label and ``**`` one or more labels *in its
  position*: the labels left of it must still match (upstream stops looking at ``**``, so its
  ``foo.**.com`` matches ``bar.example.com``; ours does not).
* An IP destination is checked against IP rules only, a name against name patterns only.
  IPv4-mapped IPv6 destinations (``::ffff:10.0.0.1``) are treated as the IPv4 address they carry,
  so they cannot slip past IPv4 deny rules.
* Deny wins over allow; nothing is allowed unless an allow rule matches.
* **Special addresses** (`special_range`: unspecified, ``0.0.0.0/8``, loopback, link-local with the
  instance metadata at ``169.254.169.254`` and ``fd00:ec2::254``, IPv4-compatible ``::/96``,
  multicast, broadcast, and — given by the caller — the parent's own addresses) are allowed only by
  an allow rule that *names* them: an IP rule that lies wholly inside the address's special range
  (``127.0.0.1``, ``127.0.0.0/8``, ``169.254.169.254``), never by a wider one (``0.0.0.0/0``,
  ``::/0``, ``10.0.0.0/8``). The same holds for the addresses an allowed *name* resolves to
  (`EgressPolicy.decide_resolved`), which closes DNS rebinding onto the parent.
* The name ``host`` (the parent instance) is allowed only by the literal rule ``host``, never by a
  wildcard; it stands for `PARENT_ADDRESS` and no other address.

Entries that upstream silently never matches (``[::1]``, ``example.com:443``, ``api-*.example.com``)
or that match far more than their author can mean (``*.*``, ``example.*`` in ``allow``) are refused
with a fix instead. A policy has no port component: ports are checked nowhere.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ListName = Literal["allow", "deny"]

#: The name that means the parent instance, and the one address it stands for on the parent.
PARENT_NAME = "host"
PARENT_ADDRESS = ipaddress.IPv4Address("127.0.0.1")

# A host-name label: letters, digits, '-' and '_' (service labels such as `_dmarc` exist in the
# wild), 1..63 characters, not starting or ending with '-'.
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# One part of a numeric address as libc's inet_aton reads it: decimal, octal (leading 0) or hex.
_NUMERIC_PART = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_MAX_NAME = 253


class PolicyError(ValueError):
    """An egress rule or destination that cannot be used as written. Carries a fix."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


@dataclass(frozen=True, slots=True)
class Finding:
    """A problem with one entry of a policy list, reported by `review`."""

    list_name: ListName
    index: int
    severity: Literal["error", "warning"]
    message: str
    fix: str


@dataclass(frozen=True, slots=True)
class NameRule:
    text: str
    labels: tuple[str, ...]

    def matches(self, labels: tuple[str, ...]) -> bool:
        return _match_labels(self.labels, labels)

    @property
    def wildcard_tld(self) -> bool:
        return self.labels[-1] in ("*", "**")


@dataclass(frozen=True, slots=True)
class IpRule:
    text: str
    network: IPNetwork
    host_bits_set: bool = False

    def matches(self, address: IPAddress) -> bool:
        return address.version == self.network.version and address in self.network


Rule = NameRule | IpRule


@dataclass(frozen=True, slots=True)
class Destination:
    """Where an app wants to go: a host name or an IP address, with an optional port."""

    text: str
    host: str
    port: int | None = None
    address: IPAddress | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.host.split("."))

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.address is not None and self.address.version == 6 else self.host
        return f"{host}:{self.port}" if self.port is not None else host


@dataclass(frozen=True, slots=True)
class Decision:
    destination: Destination
    allowed: bool
    reason: str
    rule: str | None = None
    list_name: ListName | None = None
    special: str | None = None  # the kind of special address (`special_range`) when that decided: named or not
    address: IPAddress | None = None  # for `decide_resolved`: the address the name resolved to

    def to_json(self) -> dict[str, object]:
        return {
            "destination": self.destination.text,
            "host": self.destination.host,
            "port": self.destination.port,
            "allowed": self.allowed,
            "list": self.list_name,
            "rule": self.rule,
            "special": self.special,
            "reason": self.reason,
        }


# --------------------------------------------------------------------------------------------
# parsing rules


def parse_rule(text: str) -> Rule:
    """Parse one allow/deny entry, or raise `PolicyError` saying how to write it."""
    if not isinstance(text, str):
        raise PolicyError(f"a rule must be a string, not {type(text).__name__}", "quote the entry")
    raw = text
    text = text.strip()
    if not text:
        raise PolicyError("an empty rule matches nothing", "remove the entry")
    if any(c.isspace() for c in text):
        raise PolicyError(f"{raw!r} contains whitespace", "remove it, or split the entry into one rule per list item")
    if text != raw:
        raise PolicyError(f"{raw!r} has leading or trailing whitespace", f"write {text!r}")
    if "://" in text:
        host = text.split("://", 1)[1].split("/", 1)[0]
        raise PolicyError(f"{text!r} is a URL, not a host", f"write the host only: {host!r}")
    ip_rule = _parse_ip_rule(text)
    if ip_rule is not None:
        return ip_rule
    return _parse_name_rule(text)


def _parse_ip_rule(text: str) -> IpRule | None:
    """An IP rule, or None when `text` is clearly not meant as one (then it is a name pattern)."""
    body, slash, prefix = text.partition("/")
    bracketed = body.startswith("[") or body.endswith("]")
    if bracketed:
        if body.startswith("[") and "]:" in body:
            raise PolicyError(
                f"{text!r} names a port, but egress rules have no port component",
                f"write {body.split(']:')[0] + ']'!r}: every port of an allowed address is allowed",
            )
        if not (body.startswith("[") and body.endswith("]")):
            raise PolicyError(f"{text!r} has an unbalanced bracket", "write [2001:db8::1] or 2001:db8::1")
        body = body[1:-1]
    if "%" in body:
        raise PolicyError(f"{text!r} has a zone identifier", "write the address without '%zone'")
    addr: IPAddress
    if ":" in body or bracketed:
        if body.count(":") == 1 and not bracketed:
            host = body.partition(":")[0]
            raise PolicyError(
                f"{text!r} names a port, but egress rules have no port component",
                f"write {host!r}: every port of an allowed host is allowed",
            )
        try:
            addr = ipaddress.IPv6Address(body)
        except ValueError:
            if bracketed:
                raise PolicyError(f"{text!r} is not a valid IPv6 address", "write e.g. [2001:db8::1]") from None
            raise PolicyError(f"{text!r} is neither an IP address nor a host name", "check the entry") from None
        mapped_only = not slash or (prefix.isdigit() and int(prefix) >= 96)
        if addr.ipv4_mapped is not None and mapped_only:
            raise PolicyError(
                f"{text!r} is an IPv4-mapped IPv6 address",
                f"write the IPv4 form ({addr.ipv4_mapped}); mapped destinations are checked as IPv4",
            )
    else:
        try:
            addr = ipaddress.IPv4Address(body)
        except ValueError:
            if slash:
                raise PolicyError(f"{text!r} is not a valid CIDR network", "write e.g. 10.0.0.0/16") from None
            return None
    if not slash:
        return IpRule(text, ipaddress.ip_network(addr))
    if addr.version == 4 and "." in prefix:
        if not _is_contiguous_netmask(prefix):
            raise PolicyError(
                f"{text!r} has a mask that is not a contiguous netmask",
                "write a prefix length, e.g. 10.0.0.0/8 (host masks like 0.255.255.255 are not accepted)",
            )
    elif not prefix.isdigit() or not prefix.isascii():
        raise PolicyError(f"{text!r} has an invalid prefix length {prefix!r}", "write e.g. 10.0.0.0/16")
    try:
        network = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
        exact = ipaddress.ip_network(f"{addr}/{prefix}", strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            return IpRule(text, network, host_bits_set=True)
        limit = 32 if addr.version == 4 else 128
        raise PolicyError(f"{text!r}: prefix length must be 0..{limit}", "write e.g. 10.0.0.0/16") from None
    return IpRule(text, exact)


def _is_contiguous_netmask(mask: str) -> bool:
    try:
        value = int(ipaddress.IPv4Address(mask))
    except ValueError:
        return False
    inverted = (~value) & 0xFFFFFFFF
    return inverted & (inverted + 1) == 0


def _parse_name_rule(text: str) -> NameRule:
    name = _strip_one_dot(text.lower(), text)
    if not name.isascii():
        raise PolicyError(f"{text!r} is not ASCII", f"write the IDNA form {_idna_hint(name)!r}")
    labels = tuple(name.split("."))
    for label in labels:
        if label in ("*", "**"):
            continue
        if not label:
            raise PolicyError(f"{text!r} has an empty label", "remove the doubled or leading dot")
        if "*" in label:
            raise PolicyError(
                f"{text!r} has a partial wildcard {label!r}: a wildcard must be a whole label",
                "use '*' for exactly one label or '**' for one or more, e.g. '*.example.com'",
            )
        if not _LABEL.match(label):
            raise PolicyError(
                f"{text!r}: label {label!r} is not a valid host-name label",
                "use letters, digits, '-' and '_' (at most 63 per label), e.g. 'api.example.com'",
            )
    if len(name) > _MAX_NAME:
        raise PolicyError(f"{text!r} is longer than {_MAX_NAME} characters", "shorten the name")
    literal = [label for label in labels if label not in ("*", "**")]
    if literal and all(_NUMERIC_PART.match(label) for label in literal):
        if len(literal) < len(labels):
            raise PolicyError(
                f"{text!r} puts wildcards in an IP address; wildcards apply to names only",
                "write a CIDR network, e.g. 10.0.0.0/8",
            )
        raise PolicyError(
            f"{text!r} looks like an IP address but is not one in canonical form",
            "write the address as four decimal octets without leading zeros, e.g. 10.0.0.1",
        )
    if labels[-1] not in ("*", "**") and labels[-1].isdigit():
        raise PolicyError(f"{text!r}: a top-level label cannot be all digits", "check the name")
    return NameRule(text, labels)


def _strip_one_dot(name: str, original: str) -> str:
    if name.endswith(".."):
        raise PolicyError(f"{original!r} ends with more than one dot", "remove the extra dots")
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


def _idna_hint(name: str) -> str:
    out = []
    for label in name.split("."):
        if label in ("*", "**") or label.isascii():
            out.append(label)
            continue
        try:
            out.append(label.encode("idna").decode("ascii"))
        except UnicodeError:
            out.append(label)
    return ".".join(out)


# --------------------------------------------------------------------------------------------
# matching


def _match_labels(pattern: tuple[str, ...], host: tuple[str, ...]) -> bool:
    """Anchored label glob: '*' is exactly one label, '**' one or more, others literal.

    Tracks the set of host positions reachable after each pattern label: O(len(pattern)·len(host)²)
    at worst, no recursion, no backtracking blow-up on hostile names.
    """
    reach = {0}
    for label in pattern:
        nxt: set[int] = set()
        for j in reach:
            if label == "**":
                nxt.update(range(j + 1, len(host) + 1))
            elif j < len(host) and (label == "*" or label == host[j]):
                nxt.add(j + 1)
        if not nxt:
            return False
        reach = nxt
    return len(host) in reach


# --------------------------------------------------------------------------------------------
# destinations


def parse_destination(text: str) -> Destination:
    """Parse ``host``, ``host:port``, ``ip``, ``ip:port``, ``v6``, ``[v6]`` or ``[v6]:port``."""
    raw = text
    text = text.strip()
    if not text:
        raise PolicyError("an empty destination", "give a host name or an IP address")
    if "://" in text or "/" in text:
        raise PolicyError(f"{raw!r} is not a host", "give a host or host:port, not a URL or a network")
    port: int | None = None
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise PolicyError(f"{raw!r} has an unbalanced bracket", "write [2001:db8::1]:443")
        if rest:
            if not rest.startswith(":"):
                raise PolicyError(f"{raw!r}: unexpected text after ']'", "write [2001:db8::1]:443")
            port = _parse_port(rest[1:], raw)
        address = _parse_address(inner, raw, bracketed=True)
        return Destination(raw, _address_host(address), port, address)
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _parse_port(port_text, raw)
        text = host
    elif text.count(":") > 1:
        address = _parse_address(text, raw, bracketed=False)
        return Destination(raw, _address_host(address), None, address)
    try:
        address4 = ipaddress.IPv4Address(text)
    except ValueError:
        return Destination(raw, _normalise_name(text, raw), port)
    return Destination(raw, str(address4), port, address4)


def _parse_port(text: str, raw: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise PolicyError(f"{raw!r}: {text!r} is not a port", "give a port from 1 to 65535")
    return int(text)


def _parse_address(text: str, raw: str, *, bracketed: bool) -> IPAddress:
    if "%" in text:
        raise PolicyError(f"{raw!r} has a zone identifier", "give the address without '%zone'")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        fix = "write e.g. [2001:db8::1]:443" if bracketed else "bracket an IPv6 address with a port: [2001:db8::1]:443"
        raise PolicyError(f"{raw!r} is not a valid IPv6 address", fix) from None
    return address.ipv4_mapped or address


def _address_host(address: IPAddress) -> str:
    return str(address)


def _normalise_name(text: str, raw: str) -> str:
    name = _strip_one_dot(text.lower(), raw)
    if not name.isascii():
        raise PolicyError(f"{raw!r} is not ASCII", f"give the IDNA form {_idna_hint(name)!r}")
    labels = name.split(".")
    if any(not _LABEL.match(label) for label in labels) or len(name) > _MAX_NAME:
        raise PolicyError(f"{raw!r} is not a valid host name", "use letters, digits, '-' and '_' in dot-separated labels")
    if all(_NUMERIC_PART.match(label) for label in labels) or labels[-1].isdigit():
        # inet_aton would read '010.1', '0x7f.1' or '2130706433' as an address: refuse the ambiguity
        raise PolicyError(
            f"{raw!r} is neither a host name nor a canonical IP address",
            "write an IPv4 address as four decimal octets without leading zeros",
        )
    return name


# --------------------------------------------------------------------------------------------
# special addresses


@dataclass(frozen=True, slots=True)
class SpecialRange:
    """A range of addresses that reach the parent instance itself or its link, not a remote host."""

    network: IPNetwork
    kind: str  # a short tag: "loopback", "link-local", "parent", ...
    label: str  # "a loopback address", for messages
    reaches: str  # what a connection to it reaches, for messages

    def describe(self, address: IPAddress) -> str:
        return f"{address} is {self.label} ({self.reaches})"


_PARENT = "the parent instance's own services"
_LINK = "the instance's link: metadata and role credentials at {}, DNS, time"
#: Every special range; an address's range is the most specific one that contains it.
SPECIAL_RANGES: tuple[SpecialRange, ...] = tuple(SpecialRange(ipaddress.ip_network(n), *rest) for n, *rest in (
    ("0.0.0.0/32", "unspecified", "the unspecified address", f"Linux connects it to the local host: {_PARENT}"),
    ("0.0.0.0/8", "this-network", "a 'this network' address (0.0.0.0/8)", "not a destination; may mean the local host"),
    ("127.0.0.0/8", "loopback", "a loopback address", _PARENT),
    ("169.254.0.0/16", "link-local", "a link-local address", _LINK.format("169.254.169.254")),
    ("224.0.0.0/4", "multicast", "a multicast address", "not one remote host"),
    ("255.255.255.255/32", "broadcast", "the broadcast address", "every host on the instance's link"),
    ("::/128", "unspecified", "the unspecified address", f"Linux connects it to the local host: {_PARENT}"),
    ("::1/128", "loopback", "a loopback address", _PARENT),
    ("::/96", "ipv4-compatible", "an IPv4-compatible address (deprecated)", "not a destination"),
    ("fe80::/10", "link-local", "a link-local address", "the instance's link"),
    ("fd00:ec2::/32", "link-local", "an EC2 instance-services address", _LINK.format("fd00:ec2::254")),
    ("ff00::/8", "multicast", "a multicast address", "not one remote host"),
))
#: IPv6 prefixes that carry an IPv4 address in their last 32 bits: mapped, translated (SIIT), NAT64.
_EMBEDDING = tuple(ipaddress.IPv6Network(n) for n in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"))


def special_range(address: IPAddress, own: Collection[IPAddress] = ()) -> SpecialRange | None:
    """The special range `address` falls in (the most specific one), or None for an ordinary address.

    `own` are the parent instance's own addresses (the host side knows them; this module does no
    I/O): each is a special range of one address, so only a rule naming exactly it allows it. An
    IPv6 address carrying an IPv4 one (``::ffff:127.0.0.1``, ``64:ff9b::7f00:1``) is special when
    the IPv4 address is, and its range is the IPv4 range inside the same prefix.
    """
    if address.version == 6:
        assert isinstance(address, ipaddress.IPv6Address)
        for prefix in _EMBEDDING:
            if address in prefix:
                inner = special_range(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),
                                      [a for a in own if a.version == 4])
                if inner is None:
                    break
                network = ipaddress.IPv6Network(
                    (int(prefix.network_address) | int(inner.network.network_address), 96 + inner.network.prefixlen))
                return SpecialRange(network, inner.kind, f"{inner.label} carried in {prefix}", inner.reaches)
    best: SpecialRange | None = None
    for candidate in SPECIAL_RANGES:
        if candidate.network.version == address.version and address in candidate.network \
                and (best is None or candidate.network.prefixlen > best.network.prefixlen):
            best = candidate
    if best is None and address in own:
        return SpecialRange(ipaddress.ip_network(address), "parent", "an address of the parent instance itself",
                            _PARENT)
    return best


def names(rule: Rule, special: SpecialRange) -> bool:
    """Whether `rule` explicitly names the addresses of `special`: it is an IP rule lying wholly
    inside that range (so it can only have been written to reach such addresses). A wider rule
    (``0.0.0.0/0``, ``::/0``, ``10.0.0.0/8``) only happens to contain them, and does not name them."""
    return (isinstance(rule, IpRule) and rule.network.version == special.network.version
            and rule.network.subnet_of(special.network))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the policy


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()

    @classmethod
    def from_lists(cls, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> EgressPolicy:
        """Build a policy; raise `PolicyError` on the first invalid entry (use `review` for all)."""
        return cls(tuple(parse_rule(t) for t in allow), tuple(parse_rule(t) for t in deny))

    @property
    def enabled(self) -> bool:
        return bool(self.allow)

    def decide(self, destination: Destination | str, *, own: Collection[IPAddress] = ()) -> Decision:
        """Whether the app may reach `destination`, and which rule says so.

        A special address (see `special_range`; `own` are the parent's own addresses, which only the
        host side knows) is allowed only by an allow rule that names it; the name `host` only by the
        literal rule `host`.
        """
        dest = parse_destination(destination) if isinstance(destination, str) else destination
        deny = _first_match(self.deny, dest)
        allow = _first_match(self.allow, dest)
        if deny is not None:
            reason = f"denied by deny rule {deny.text!r}"
            if allow is not None:
                reason += f" (deny wins over allow rule {allow.text!r})"
            return Decision(dest, False, reason, deny.text, "deny")
        if dest.address is not None:
            special = special_range(dest.address, own)
            if special is not None:
                return self._decide_special(dest, dest.address, special, allow)
        elif dest.host == PARENT_NAME and allow is not None and not _is_parent_rule(allow):
            literal = next((r for r in self.allow if _is_parent_rule(r)), None)
            if literal is None:
                return Decision(dest, False, f"'{PARENT_NAME}' is the parent instance: only the allow rule "
                                             f"'{PARENT_NAME}' itself allows it, not the wildcard {allow.text!r}")
            allow = literal
        if allow is not None:
            return Decision(dest, True, f"allowed by allow rule {allow.text!r}", allow.text, "allow")
        return Decision(dest, False, self._default_reason(dest))

    def _decide_special(self, dest: Destination, address: IPAddress, special: SpecialRange,
                        allow: Rule | None, via: Decision | None = None) -> Decision:
        """An allow rule must name a special address; one that merely contains it is not enough.
        `via` is the decision on the name when `address` is what an allowed name resolved to."""
        naming = next((r for r in self.allow if isinstance(r, IpRule) and r.matches(address) and names(r, special)),
                      None)
        what = special.describe(address)
        resolved = address if via is not None else None
        if naming is not None:
            if via is not None:
                return Decision(dest, True, f"{via.reason}; it resolves to {address}, named by allow rule "
                                            f"{naming.text!r} ({what})", via.rule, "allow", special.kind, resolved)
            return Decision(dest, True, f"allowed by allow rule {naming.text!r}, which names it ({what})",
                            naming.text, "allow", special.kind)
        if via is None and allow is None:
            return Decision(dest, False, self._default_reason(dest))
        fix = f"only an allow rule that names it allows it, e.g. {str(address)!r}"
        if special.reaches == _PARENT:
            fix += f"; for the parent's services use '{PARENT_NAME}'"
        if via is None:
            assert allow is not None
            reason = f"{what}: allow rule {allow.text!r} contains it but does not name it; {fix}"
        else:
            reason = (f"{dest.host} resolves to {address}: {what}; allow rule {via.rule!r} allows the name, not this "
                      f"address (DNS can point any name there); {fix}")
        return Decision(dest, False, reason, special=special.kind, address=resolved)

    def decide_resolved(self, destination: Destination | str, address: IPAddress | str, *,
                        own: Collection[IPAddress] = ()) -> Decision:
        """Whether the app may reach the name `destination` at `address`, one of the addresses it
        resolves to (the host side asks this for every one of them before connecting).

        The name must be allowed; then no deny rule may cover the address (deny wins after DNS too),
        and a special address needs an allow rule naming it, as if it were dialled directly — so a
        DNS answer cannot rebind an allowed name onto the parent's loopback, the instance metadata
        or the parent's own addresses (`own`). `host` stands for `PARENT_ADDRESS` and nothing else.
        """
        dest = parse_destination(destination) if isinstance(destination, str) else destination
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if dest.address is not None:
            if ip != dest.address:
                return Decision(dest, False, f"{dest.address} is an address, it cannot resolve to {ip}", address=ip)
            return self.decide(dest, own=own)
        by_name = self.decide(dest)
        if not by_name.allowed:
            return by_name
        if dest.host == PARENT_NAME:
            if ip == PARENT_ADDRESS:
                return Decision(dest, True, f"{by_name.reason} (the parent instance, {PARENT_ADDRESS})",
                                by_name.rule, "allow", address=ip)
            return Decision(dest, False, f"'{PARENT_NAME}' stands for {PARENT_ADDRESS} only, not {ip}", address=ip)
        deny = _first_match(self.deny, Destination(str(ip), str(ip), dest.port, ip))
        if deny is not None:
            return Decision(dest, False, f"{dest.host} resolves to {ip}, denied by deny rule {deny.text!r} "
                                         "(deny wins after DNS too)", deny.text, "deny", address=ip)
        special = special_range(ip, own)
        if special is not None:
            return self._decide_special(dest, ip, special, None, via=by_name)
        return Decision(dest, True, f"{by_name.reason}; it resolves to {ip}", by_name.rule, "allow", address=ip)

    def _default_reason(self, dest: Destination) -> str:
        if not self.allow:
            return "egress is off: there are no allow rules (default deny)"
        wanted = IpRule if dest.address is not None else NameRule
        if not any(isinstance(r, wanted) for r in self.allow):
            kind = "IP and CIDR rules" if dest.address is not None else "name patterns"
            what = "an IP address" if dest.address is not None else "a host name"
            return f"no allow rule matches: {what} is checked only against {kind}, and there are none (default deny)"
        return "no allow rule matches (default deny)"


def _is_parent_rule(rule: Rule) -> bool:
    return isinstance(rule, NameRule) and rule.labels == (PARENT_NAME,)


def _first_match(rules: tuple[Rule, ...], dest: Destination) -> Rule | None:
    for rule in rules:
        if dest.address is not None:
            if isinstance(rule, IpRule) and rule.matches(dest.address):
                return rule
        elif isinstance(rule, NameRule) and rule.matches(dest.labels):
            return rule
    return None


def review(allow: Sequence[object], deny: Sequence[object]) -> list[Finding]:
    """Every problem with a policy's entries, errors and warnings, in list order.

    Beyond well-formedness, ``allow`` entries that match far more than intended are refused
    (a wildcard top-level label) or flagged (``**``, ``0.0.0.0/0``, host bits in a CIDR).
    """
    findings: list[Finding] = []
    lists: tuple[tuple[ListName, Sequence[object]], ...] = (("allow", allow), ("deny", deny))
    for list_name, entries in lists:
        seen: dict[str, int] = {}
        for index, text in enumerate(entries):
            for severity, message, fix in _review_entry(list_name, text, seen, index):
                findings.append(Finding(list_name, index, severity, message, fix))
    return findings


def _review_entry(
    list_name: ListName, text: object, seen: dict[str, int], index: int
) -> list[tuple[Literal["error", "warning"], str, str]]:
    try:
        rule = parse_rule(text)  # type: ignore[arg-type]
    except PolicyError as e:
        return [("error", e.message, e.fix)]
    out: list[tuple[Literal["error", "warning"], str, str]] = []
    key = rule.text.lower().rstrip(".")
    if key in seen:
        out.append(("warning", f"{rule.text!r} repeats entry [{seen[key]}]", "remove the duplicate"))
    seen.setdefault(key, index)
    if isinstance(rule, IpRule):
        if rule.host_bits_set:
            out.append(("warning", f"{rule.text!r} has host bits set; it means {rule.network}",
                        f"write {str(rule.network)!r}"))
        if list_name == "allow" and rule.network.prefixlen == 0:
            out.append(("warning", f"{rule.text!r} allows every IPv{rule.network.version} address (but not the "
                                   "loopback, link-local and other special ones, which need a rule naming them)",
                        "name the networks the app needs"))
    elif list_name == "allow":
        if rule.labels == ("**",):
            out.append(("warning", "'**' allows every host name", "name the domains the app needs, e.g. '**.example.com'"))
        elif rule.wildcard_tld and rule.labels != ("*",):
            out.append(("error",
                        f"{rule.text!r} is not a valid allow pattern: a wildcard top-level label matches every domain",
                        "name the domain, e.g. '**.example.com'"))
    return out

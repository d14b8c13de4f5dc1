"""Checks the schema cannot express: ports, Nitro's resource rules, egress rules, KMS needs.

Pure: works on already-parsed data and reports through a `Locator`. Values of the wrong type
are skipped here (the schema pass reports them), so a file with many problems still gets all of
them reported in one run.
"""

from __future__ import annotations

import re
from typing import Any

from enclaver_rules.errors import Diagnostic
from enclaver_rules.manifest._yaml import Path
from enclaver_rules.manifest.model import KmsEndpoint
from enclaver_rules.manifest.validate import Locator, diagnostic
from enclaver_rules.policy import EgressPolicy, NameRule, review
from enclaver_rules.policy.egress import PolicyError
from enclaver_rules.ports import DEFAULT_EGRESS_PROXY_PORT, IMDS_ADDRESS, RESERVED_VSOCK_PORTS, TRANSPARENT_DNS_PORT

_ENDPOINT = re.compile(r"(https?://)?[A-Za-z0-9._-]+(:[0-9]{1,5})?")  # the schema's pattern

#: Old source names → new ones (upstream renamed them without aliases; we accept both).
RENAMED_SOURCES = {"supervisor": "odyn", "wrapper": "sleeve"}


def _map(data: Any, key: str) -> dict[str, Any]:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def _port(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535 else None


def semantic_diagnostics(data: Any, loc: Locator) -> list[Diagnostic]:
    if not isinstance(data, dict):
        return []
    out: list[Diagnostic] = []
    out += _renamed_sources(data, loc)
    out += _unsupported(data, loc)
    out += _ports(data, loc)
    out += _resources(data, loc)
    out += _egress(data, loc)
    out += _kms(data, loc)
    out += _outputs(data, loc)
    return out


def _outputs(data: dict[str, Any], loc: Locator) -> list[Diagnostic]:
    """`outputs:` (ours): the schema checked the form; refuse `.`/`..` components and nesting (one
    file would leave twice, under two names)."""
    outputs = data.get("outputs")
    if not isinstance(outputs, list):
        return []
    out = []
    seen: list[tuple[int, str]] = []
    for index, path in enumerate(outputs):
        if not isinstance(path, str) or not path.startswith("/"):
            continue
        parts = path.split("/")[1:]
        if any(part in (".", "..") for part in parts):
            out.append(diagnostic(loc, ("outputs", index), f"output {path!r} has a `.` or `..` component",
                                  "write the directory's plain absolute path"))
            continue
        for other_index, other in seen:
            if path.startswith(other + "/") or other.startswith(path + "/"):
                out.append(diagnostic(loc, ("outputs", index), f"output {path!r} overlaps outputs[{other_index}] {other!r}",
                                      "list each directory once: the outer one already includes the inner"))
        seen.append((index, path))
    return out


def _renamed_sources(data: dict[str, Any], loc: Locator) -> list[Diagnostic]:
    out = []
    sources = _map(data, "sources")
    for old, new in RENAMED_SOURCES.items():
        if old not in sources:
            continue
        path: Path = ("sources", old)
        if new in sources:
            out.append(diagnostic(loc, path, f"both `{new}` and its old name `{old}` are set", f"keep only `{new}`", key=True))
        else:
            out.append(diagnostic(loc, path, f"`{old}` is the old name of `{new}` (upstream 0.5)",
                                  f"rename it to `{new}`", key=True, severity="warning"))
    return out


def _unsupported(data: dict[str, Any], loc: Locator) -> list[Diagnostic]:
    if "spire" not in data:
        return []
    return [diagnostic(loc, ("spire",), "SPIFFE/SPIRE identities are not supported by this enclaver yet",
                       "remove the `spire` block; the rest of the manifest is unaffected", key=True)]


def _ports(data: dict[str, Any], loc: Locator) -> list[Diagnostic]:
    """Every in-enclave listener needs its own port; ingress ports double as vsock ports."""
    listeners: list[tuple[Path, int, str]] = []
    ingress = data.get("ingress")
    for i, item in enumerate(ingress if isinstance(ingress, list) else []):
        port = _port(item.get("listen_port")) if isinstance(item, dict) else None
        if port is not None:
            listeners.append((("ingress", i, "listen_port"), port, f"ingress[{i}].listen_port"))
    for section in ("api", "kms_proxy"):
        port = _port(_map(data, section).get("listen_port"))
        if port is not None:
            listeners.append(((section, "listen_port"), port, f"{section}.listen_port"))
    egress = _map(data, "egress")
    if "proxy_port" in egress:
        port = _port(egress["proxy_port"])
        if port is not None:
            listeners.append((("egress", "proxy_port"), port, "egress.proxy_port"))
    elif egress.get("allow"):
        listeners.append((("egress",), DEFAULT_EGRESS_PROXY_PORT, "egress.proxy_port (default)"))
    if egress.get("transparent") is True and egress.get("allow"):
        listeners.append((("egress", "transparent"), TRANSPARENT_DNS_PORT, "egress.transparent's DNS (port 53)"))

    out = []
    first: dict[int, tuple[Path, str]] = {}
    for path, port, label in listeners:
        if path[0] == "ingress" and port in RESERVED_VSOCK_PORTS:
            out.append(diagnostic(
                loc, path, f"port {port} is enclaver's internal {RESERVED_VSOCK_PORTS[port]} vsock port",
                "use a port outside 17000–17003"))
        if port in first:
            other_path, other = first[port]
            where = loc.locate(other_path)
            at = f" (line {where[1]})" if where[1] and where[0] == loc.locate(path)[0] else ""
            if path == ("egress",):  # the implicit default collides: point at the explicit one
                out.append(diagnostic(loc, other_path, f"port {port} is also the egress proxy's default port",
                                      "set `egress.proxy_port` to another port, or move this listener"))
            else:
                out.append(diagnostic(loc, path, f"port {port} is already used by {other}{at}",
                                      "give every listener in the enclave its own port"))
        else:
            first[port] = (path, label)
    return out


def _resources(data: dict[str, Any], loc: Locator) -> list[Diagnostic]:
    cpus = _map(data, "defaults").get("cpu_count")
    if isinstance(cpus, int) and not isinstance(cpus, bool) and cpus >= 1 and cpus % 2 == 1:
        return [diagnostic(
            loc, ("defaults", "cpu_count"),
            f"{cpus} vCPUs: Nitro only starts enclaves on whole cores, so on x86 instances with two threads per core this fails",
            "use an even count, unless the host is Graviton (one thread per core)", severity="warning")]
    return []


def _egress(data: dict[str, Any], loc: Locator) -> list[Diagnostic]:
    egress = _map(data, "egress")
    allow: list[Any] = egress["allow"] if isinstance(egress.get("allow"), list) else []
    deny: list[Any] = egress["deny"] if isinstance(egress.get("deny"), list) else []
    out = []
    for f in review(allow, deny):
        if isinstance((allow if f.list_name == "allow" else deny)[f.index], str):
            out.append(diagnostic(loc, ("egress", f.list_name, f.index), f.message, f.fix, severity=f.severity))
    if deny and not allow:
        out.append(diagnostic(loc, ("egress", "deny"), "`deny` has no effect without `allow`: egress is off",
                              "add `allow` entries, or remove `deny`", key=True, severity="warning"))
    if egress.get("transparent") is True and not allow:
        out.append(diagnostic(loc, ("egress", "transparent"), "transparent egress needs `allow` entries: egress is off",
                              "add `allow` entries, or remove `transparent`", key=True))
    if "proxy_port" in egress and not allow:
        out.append(diagnostic(loc, ("egress", "proxy_port"), "egress is off (no `allow` entries), so no proxy runs",
                              "add `allow` entries, or remove `proxy_port`", key=True, severity="warning"))
    return out


def _policy(data: dict[str, Any]) -> EgressPolicy | None:
    egress = _map(data, "egress")
    allow, deny = egress.get("allow"), egress.get("deny")
    try:
        return EgressPolicy.from_lists(
            [a for a in allow if isinstance(a, str)] if isinstance(allow, list) else [],
            [d for d in deny if isinstance(d, str)] if isinstance(deny, list) else [],
        )
    except PolicyError:
        return None  # already reported by _egress


def _kms(data: dict[str, Any], loc: Locator) -> list[Diagnostic]:
    """The KMS proxy reaches IMDS and KMS through egress; upstream only finds out at start-up."""
    if "kms_proxy" not in data:
        return []
    kms = _map(data, "kms_proxy")
    policy = _policy(data)
    if policy is None:
        return []
    if not policy.enabled:
        return [diagnostic(loc, ("kms_proxy",), "the KMS proxy needs egress, but egress is off",
                           f"add `egress.allow` entries for {IMDS_ADDRESS} and kms.*.amazonaws.com", key=True)]
    out = []
    imds = policy.decide(IMDS_ADDRESS)
    if not imds.allowed:
        out.append(diagnostic(
            loc, ("kms_proxy",),
            f"the KMS proxy gets its region and credentials from {IMDS_ADDRESS}, which egress does not allow",
            f"add {IMDS_ADDRESS!r} to `egress.allow`", key=True))
    endpoints: dict[str, Any] = kms["endpoints"] if isinstance(kms.get("endpoints"), dict) else {}
    for region, text in endpoints.items():
        if not isinstance(text, str) or not _ENDPOINT.fullmatch(text):
            continue  # the schema reports it
        path: Path = ("kms_proxy", "endpoints", region)
        try:
            endpoint = KmsEndpoint.parse(text)
        except ValueError as e:  # the pattern passed: the port is out of range
            out.append(diagnostic(loc, path, str(e), "give a port from 1 to 65535"))
            continue
        try:
            decision = policy.decide(f"{endpoint.host}:{endpoint.port}")
        except PolicyError as e:
            out.append(diagnostic(loc, path, f"not a destination egress can judge: {e.message}",
                                  "give a host name or an IP address"))
            continue
        if not endpoint.tls:
            out.append(diagnostic(
                loc, path, "plain HTTP: the KMS proxy's signed requests and KMS's answers (data keys sealed "
                           "for the enclave, ciphertexts) cross the parent instance in the clear",
                "use this only for a local KMS in tests (`enclaver kms serve`); give `host` or `host:port` "
                "(HTTPS) for AWS KMS", severity="warning"))
        if not decision.allowed:
            out.append(diagnostic(loc, path, f"egress does not allow this endpoint ({decision.reason})",
                                  f"add {endpoint.host!r} to `egress.allow`"))
    if not endpoints and not _any_kms_endpoint_allowed(policy):
        out.append(diagnostic(
            loc, ("kms_proxy",), "egress allows no KMS endpoint (kms.<region>.amazonaws.com)",
            "add 'kms.*.amazonaws.com', or the endpoint of your key's region, to `egress.allow`",
            key=True, severity="warning"))
    return out


def _any_kms_endpoint_allowed(policy: EgressPolicy) -> bool:
    regions = {"us-east-1"}
    for rule in policy.allow:
        if isinstance(rule, NameRule) and len(rule.labels) == 4 and rule.labels[0] == "kms" \
                and rule.labels[1] not in ("*", "**"):
            regions.add(rule.labels[1])
    return any(policy.decide(f"kms.{r}.amazonaws.com").allowed for r in sorted(regions))


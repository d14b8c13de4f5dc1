"""A plain-language account of what a manifest asks for: what runs, what can reach it, what it can reach.

Pure: `explain(manifest)` returns rows; the CLI decides how to show them.
"""

from __future__ import annotations

from dataclasses import dataclass

from enclaver_rules.manifest.model import Manifest
from enclaver_rules.policy import IpRule, NameRule, parse_rule
from enclaver_rules.ports import IMDS_ADDRESS

KMS_ATTESTED_ACTIONS = ("Decrypt", "GenerateDataKey", "GenerateDataKeyPair", "DeriveSharedSecret", "GenerateRandom")


@dataclass(frozen=True, slots=True)
class Row:
    topic: str
    text: str
    notes: tuple[str, ...] = ()


def _image(ref: str | None, what: str) -> str:
    return ref if ref else f"enclaver's default {what} image"


def _pinned(ref: str) -> tuple[str, ...]:
    return () if "@sha256:" in ref else ("a tag, not a digest: `enclaver build` pins the digest it resolves",)


def describe_rule(text: str) -> str:
    rule = parse_rule(text)
    if isinstance(rule, IpRule):
        if rule.network.num_addresses == 1:
            extra = " (instance metadata)" if str(rule.network.network_address) == IMDS_ADDRESS else ""
            return f"{text}{extra}"
        return f"{text} ({rule.network.num_addresses} addresses)"
    assert isinstance(rule, NameRule)
    if rule.labels == ("host",):
        return "host (the parent instance)"
    meanings = [m for w, m in (("*", "* = exactly one label"), ("**", "** = one or more labels")) if w in rule.labels]
    return f"{text} ({', '.join(meanings)})" if meanings else text


def explain(m: Manifest) -> list[Row]:
    rows = [
        Row("app", m.sources.app, _pinned(m.sources.app)),
        Row("release image", m.target),
        Row("odyn", _image(m.sources.odyn, "odyn")),
        Row("release base", m.sources.sleeve or "enclaver's runtime image (enclaver/runtime:default): `docker run "
            "--device /dev/nitro_enclaves` of the release starts the enclave (an aarch64 app: none)"),
        Row("resources", f"{m.defaults.cpu_count} vCPUs, {m.defaults.memory_mb} MiB (the manifest's defaults; a run may ask for others)"),
    ]
    if m.ingress:
        for ing in m.ingress:
            tls = "; odyn terminates TLS" if ing.tls else ""
            rows.append(Row("ingress", f"port {ing.listen_port}: host TCP {ing.listen_port} → vsock {ing.listen_port} → "
                                       f"127.0.0.1:{ing.listen_port} in the enclave{tls}"))
    else:
        rows.append(Row("ingress", "none: nothing outside can connect to the enclave"))
    if m.egress.enabled:
        allowed = [describe_rule(r) for r in m.egress.allow]
        notes = tuple(f"denied: {r}" for r in m.egress.deny) + ("everything else is denied",)
        rows.append(Row("egress", f"through the proxy at 127.0.0.1:{m.egress.proxy_port} (HTTP_PROXY/HTTPS_PROXY); "
                                  f"allowed: {', '.join(allowed)}", notes))
    else:
        rows.append(Row("egress", "off: the enclave has no outbound network"))
    if m.kms_proxy:
        endpoints = ", ".join(f"{r} → {e}" for r, e in m.kms_proxy.endpoints) or "kms.<region>.amazonaws.com"
        rows.append(Row("KMS proxy", f"127.0.0.1:{m.kms_proxy.listen_port} (AWS_KMS_ENDPOINT); endpoints: {endpoints}",
                        (f"attaches an attestation document to {', '.join(KMS_ATTESTED_ACTIONS)}",)))
    else:
        rows.append(Row("KMS proxy", "off"))
    rows.append(Row("attestation API", f"POST http://127.0.0.1:{m.api.listen_port}/v1/attestation" if m.api else "off"))
    rows.append(Row("signature", f"signed with {m.signature.certificate} (PCR8 pins the certificate)"
                    if m.signature else "unsigned (no PCR8)"))
    return rows


def render_text(m: Manifest) -> list[str]:
    """The explanation as plain lines (the CLI adds colour; the doit task prints them as they are)."""
    lines = [f"{m.name}  ({m.path})"]
    for row in explain(m):
        lines.append(f"  {row.topic:<16} {row.text}")
        lines.extend(f"  {'':<16} · {note}" for note in row.notes)
    return lines

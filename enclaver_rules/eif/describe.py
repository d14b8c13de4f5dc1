"""Read an EIF back: recompute its PCRs from the sections, check its CRC and signature, and
describe it as `nitro-cli describe-eif` does (same keys, same order)."""

from __future__ import annotations

import json
from typing import Any

from enclaver_rules.eif.format import (
    SECTION_CMDLINE,
    SECTION_KERNEL,
    SECTION_METADATA,
    SECTION_RAMDISK,
    SECTION_SIGNATURE,
    EifFile,
    read_eif,
)
from enclaver_rules.eif.measure import Measurements, Measurer
from enclaver_rules.eif.sign import SignatureInfo, read_signature


def measure(eif: EifFile) -> tuple[Measurements, SignatureInfo | None]:
    measurer = Measurer()
    for section in eif.sections:
        if section.kind == SECTION_RAMDISK:
            measurer.start_ramdisk()
        if section.kind in (SECTION_KERNEL, SECTION_CMDLINE, SECTION_RAMDISK):
            for chunk in eif.chunks(section):
                if section.kind == SECTION_RAMDISK:
                    measurer.feed_ramdisk(chunk)
                else:
                    measurer.feed_boot(chunk)
    signatures = eif.of(SECTION_SIGNATURE)
    signature = read_signature(eif.read(signatures[0])) if signatures else None
    return measurer.result(signature.pcr8 if signature else None), signature


def describe(path: str) -> dict[str, Any]:
    eif = read_eif(path)
    measurements, signature = measure(eif)
    out: dict[str, Any] = {"EifVersion": eif.version, "Measurements": measurements.to_json(),
                           "IsSigned": signature is not None}
    if signature is not None:
        cert = signature.certificate
        out["SigningCertificate"] = {
            "IssuerName": {attr.oid._name: attr.value for attr in cert.issuer},
            "Algorithm": signature.algorithm,
            "NotBefore": cert.not_valid_before_utc.isoformat(),
            "NotAfter": cert.not_valid_after_utc.isoformat(),
            "Signature": ":".join(f"{b:02X}" for b in cert.signature),
        }
    out["CheckCRC"] = eif.crc_ok
    if signature is not None:
        out["SignatureCheck"] = signature.valid and signature.signed_pcr0 == measurements.pcr0
    metadata = eif.of(SECTION_METADATA)
    if metadata:
        info = json.loads(eif.read(metadata[0]))
        out["ImageName"] = info.get("ImageName")
        out["ImageVersion"] = info.get("ImageVersion")
        details = dict(info.get("BuildMetadata") or {})
        details["DockerInfo"] = info.get("DockerInfo")
        if isinstance(info.get("CustomMetadata"), dict):
            details.update(info["CustomMetadata"])
        out["Metadata"] = {k: v for k, v in details.items() if v is not None}
    out["Arch"] = eif.arch
    out["Sections"] = [{"Type": s.name, "Offset": s.offset, "Size": s.size} for s in eif.sections]
    return out

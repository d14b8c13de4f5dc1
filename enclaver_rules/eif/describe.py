"""Read an EIF back: recompute its PCRs from the sections, check its CRC and signature, and
describe it as `nitro-cli describe-eif` does (same keys, same order)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from enclaver_rules.eif.format import (
    SECTION_CMDLINE,
    SECTION_KERNEL,
    SECTION_METADATA,
    SECTION_RAMDISK,
    SECTION_SIGNATURE,
    EifError,
    EifFile,
    Section,
    read_eif,
)
from enclaver_rules.eif.measure import Measurements, Measurer
from enclaver_rules.eif.metadata import read_metadata
from enclaver_rules.eif.sign import MAX_SIGNATURE_SECTION, SignatureInfo, read_signature

#: nitro-cli's metadata is under 1 KiB; custom metadata files are small JSON too.
MAX_METADATA_SECTION = 1 << 20


def measure(eif: EifFile) -> tuple[Measurements, SignatureInfo | None]:
    with Measurer() as measurer:
        for section in eif.sections:
            if section.kind == SECTION_RAMDISK:
                measurer.start_ramdisk()
            if section.kind in (SECTION_KERNEL, SECTION_CMDLINE, SECTION_RAMDISK):
                for chunk in eif.chunks(section):
                    if section.kind == SECTION_RAMDISK:
                        measurer.feed_ramdisk(chunk)
                    else:
                        measurer.feed_boot(chunk)
        found = measurer.result()
    signatures = eif.of(SECTION_SIGNATURE)
    signature = None
    if signatures:
        section = signatures[0]
        signature = read_signature(eif.read(section, MAX_SIGNATURE_SECTION),
                                   f"{eif.path}: the signature section at offset {section.offset}")
    return Measurements(found.pcr0, found.pcr1, found.pcr2, signature.pcr8 if signature else None), signature


def describe(path: str) -> dict[str, Any]:
    eif = read_eif(path)
    measurements, signature = measure(eif)
    metadata = eif.of(SECTION_METADATA)
    raw = (eif.read(metadata[0], MAX_METADATA_SECTION), f"{path}: the metadata section at offset "
           f"{metadata[0].offset}") if metadata else None
    return description(eif.version, measurements, signature, eif.crc_ok, eif.arch, eif.sections, raw)


def description(version: int, measurements: Measurements, signature: SignatureInfo | None, crc_ok: bool,
                arch: str, sections: Sequence[Section], metadata: tuple[bytes, str] | None) -> dict[str, Any]:
    """describe-eif's document from what was read, in its key order: one place for the file
    (`describe`) and for a stream (eif/stream.py). `metadata` is the section's bytes and where
    they are (for the error). Pure."""
    out: dict[str, Any] = {"EifVersion": version, "Measurements": measurements.to_json(),
                           "IsSigned": signature is not None}
    if signature is not None:
        out["SigningCertificate"] = {
            "IssuerName": signature.issuer,
            "Algorithm": signature.algorithm,
            "NotBefore": signature.not_before,
            "NotAfter": signature.not_after,
            "Signature": signature.certificate_signature,
        }
    out["CheckCRC"] = crc_ok
    if signature is not None and measurements.pcr0:  # PCR0 not measured: the caller checks the claim
        out["SignatureCheck"] = signature.valid and signature.signed_pcr0 == measurements.pcr0
    if metadata is not None:
        raw, where = metadata
        try:
            out.update(read_metadata(raw))
        except ValueError as e:
            raise EifError(f"{where} is malformed: {str(e)[:200]}",
                           fix="the EIF is corrupt or malicious: rebuild it") from None
    out["Arch"] = arch
    out["Sections"] = [{"Type": s.name, "Offset": s.offset, "Size": s.size} for s in sections]
    return out

"""Why two EIFs measure differently: which PCR, which section, which file in the root file system.

PCR0 covers every boot section (kernel, cmdline, both ramdisks); PCR1 the kernel, the cmdline and
the bootstrap ramdisk (the blob set); PCR2 the customer ramdisk (the image's root file system plus
cmd and env); PCR8 the signing certificate (eif.md). So a differing section names the PCRs it moves,
and a differing customer ramdisk is opened and compared entry by entry: a missing, added or changed
file, or a changed mode, owner or mtime, is named by its path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from enclaver_rules.eif.format import (
    SECTION_CMDLINE,
    SECTION_KERNEL,
    SECTION_METADATA,
    SECTION_RAMDISK,
    SECTION_SIGNATURE,
    EifFile,
    read_eif,
)

NEWC_MAGIC = b"070701"


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    mode: int
    uid: int
    gid: int
    mtime: int
    sha256: str
    size: int


def newc_entries(data: bytes) -> dict[str, Entry]:
    """The entries of a newc cpio archive (linuxkit's ramdisks). Written here rather than taken from
    a library: the stdlib has no cpio reader and this needs only the header fields."""
    entries: dict[str, Entry] = {}
    pos = 0
    while pos + 110 <= len(data):
        if data[pos:pos + 6] != NEWC_MAGIC:
            raise ValueError(f"not a newc header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode("utf-8", "replace")
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size + (-(pos + size) % 4)
        if name == "TRAILER!!!":
            break
        entries[name] = Entry(name, fields[1], fields[2], fields[3], fields[5], hashlib.sha256(body).hexdigest(), size)
    return entries


def _ramdisk_entries(eif: EifFile, index: int) -> dict[str, Entry]:
    ramdisks = eif.of(SECTION_RAMDISK)
    return newc_entries(eif.read(ramdisks[index])) if index < len(ramdisks) else {}


def _entry_diff(a: Entry, b: Entry) -> list[str]:
    out = []
    if a.sha256 != b.sha256:
        out.append(f"content differs ({a.size} → {b.size} bytes, sha256 {a.sha256[:12]} → {b.sha256[:12]})")
    for field in ("mode", "uid", "gid", "mtime"):
        x, y = getattr(a, field), getattr(b, field)
        if x != y:
            out.append(f"{field} {oct(x) if field == 'mode' else x} → {oct(y) if field == 'mode' else y}")
    return out


def explain(expected_path: str, actual_path: str, limit: int = 50) -> list[str]:
    """Lines saying how `actual` differs from `expected`, most telling first (empty: identical boot
    sections). Section data is compared by digest; the customer ramdisk down to each file."""
    expected, actual = read_eif(expected_path), read_eif(actual_path)
    lines: list[str] = []
    moves = {SECTION_KERNEL: "PCR0, PCR1 (kernel: another blob set)",
             SECTION_CMDLINE: "PCR0, PCR1 (kernel command line: another blob set)",
             SECTION_SIGNATURE: "PCR8 (signing certificate)",
             SECTION_METADATA: "no PCR (metadata only)"}
    for kind, what in moves.items():
        a, b = expected.of(kind), actual.of(kind)
        if [expected.read(s) for s in a] != [actual.read(s) for s in b]:
            lines.append(f"{what}: the {a[0].name if a else b[0].name if b else kind} section differs")
    ramdisks_a, ramdisks_b = expected.of(SECTION_RAMDISK), actual.of(SECTION_RAMDISK)
    if ramdisks_a[:1] and ramdisks_b[:1] and expected.read(ramdisks_a[0]) != actual.read(ramdisks_b[0]):
        lines.append("PCR0, PCR1 (bootstrap ramdisk: another blob set's init or nsm.ko)")
    if ramdisks_a[1:] and ramdisks_b[1:] and expected.read(ramdisks_a[1]) != actual.read(ramdisks_b[1]):
        a_entries, b_entries = _ramdisk_entries(expected, 1), _ramdisk_entries(actual, 1)
        files = []
        for name in sorted(set(a_entries) | set(b_entries)):
            if name not in b_entries:
                files.append(f"  {name}: only in the expected EIF")
            elif name not in a_entries:
                files.append(f"  {name}: only in the rebuilt EIF")
            else:
                changes = _entry_diff(a_entries[name], b_entries[name])
                if changes:
                    files.append(f"  {name}: {'; '.join(changes)}")
        lines.append(f"PCR0, PCR2 (customer ramdisk: the image's root file system, cmd and env): "
                     f"{len(files)} entr{'y differs' if len(files) == 1 else 'ies differ'}")
        lines += files[:limit] + ([f"  … and {len(files) - limit} more"] if len(files) > limit else [])
    return lines

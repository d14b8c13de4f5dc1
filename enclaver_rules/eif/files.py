"""Read one file out of an EIF's customer ramdisk without reading the ramdisk.

Why: the host side of `enclaver run` must enforce the manifest the enclave itself runs with, and the
only copy that the PCRs vouch for is the one inside the EIF (`rootfs/etc/enclaver/enclaver.yaml` in
the last ramdisk, measured into PCR0 and PCR2). A release image's `/enclave/enclaver.yaml` sits
beside the EIF unmeasured, so a tampered one could loosen the host's egress check; reading the EIF's
own copy closes that gap. The ramdisk is as large as the app (gigabytes), so the newc headers are
walked with seeks: only the headers and the one file's body are read.

Everything in the ramdisk is hostile until checked: each header's magic, fields and name length,
each offset against the section's end, and the wanted file's size against a limit.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

from enclaver_rules.eif.format import SECTION_RAMDISK, EifError, EifFile, Section

NEWC_MAGIC = b"070701"
HEADER = 110
NAME_MAX = 4096  # PATH_MAX: no name in a ramdisk enclaver or linuxkit writes is longer
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return -n % 4


def find_file(eif: EifFile, name: str, limit: int, section: Section | None = None) -> bytes | None:
    """The body of the regular file `name` (as stored, e.g. `rootfs/etc/enclaver/enclaver.yaml`) in
    `section` (default: the last ramdisk, the customer's); None when there is no such entry.

    An `EifError` when the archive is malformed or the file is larger than `limit` bytes. If the
    name occurs twice, the last one wins, as it does when the kernel unpacks the archive."""
    if section is None:
        ramdisks = eif.of(SECTION_RAMDISK)
        if not ramdisks:
            raise EifError(f"{eif.path}: has no ramdisk", fix="this is not an EIF an enclave can boot")
        section = ramdisks[-1]
    with open(eif.path, "rb") as f:
        return _scan(f, eif.path, section, name, limit)


def _scan(f: BinaryIO, path: str, section: Section, name: str, limit: int) -> bytes | None:
    start, end = section.data_offset, section.data_offset + section.size
    pos, found = start, None

    def bad(why: str) -> EifError:
        return EifError(f"{path}: the {section.name} at offset {section.offset}: {why} at byte {pos - start}",
                        fix="the EIF is corrupt or malicious: do not run it")

    while True:
        if pos + HEADER > end:
            raise bad("the archive ends without its trailer")
        f.seek(pos)
        header = f.read(HEADER)
        if len(header) != HEADER:
            raise bad("the file ends inside a header")
        if header[:6] != NEWC_MAGIC:
            raise bad("not a newc cpio header")
        try:
            fields = [int(header[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise bad("a header field is not hexadecimal") from None
        mode, size, namesize = fields[1], fields[6], fields[11]
        if not 1 <= namesize <= NAME_MAX + 1:
            raise bad(f"a name of {namesize} bytes")
        body = pos + HEADER + namesize
        body += _pad4(body - start)
        if body + size > end:
            raise bad("an entry runs past the ramdisk's end")
        raw = f.read(namesize)
        if len(raw) != namesize or raw[-1:] != b"\0":
            raise bad("a name that is not NUL-terminated")
        entry = raw[:-1].decode("utf-8", "surrogateescape")
        if entry == TRAILER:
            return found
        if entry == name:
            if not stat.S_ISREG(mode):
                raise bad(f"{name} is not a regular file (mode {mode:o})")
            if size > limit:
                raise bad(f"{name} is {size:,} bytes, more than the {limit:,} allowed")
            f.seek(body)
            found = f.read(size)
            if len(found) != size:
                raise bad(f"the file ends inside {name}")
        pos = body + size + _pad4(body + size - start)

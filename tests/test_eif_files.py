"""`eif.files.find_file`: one file out of an EIF's customer ramdisk, headers walked with seeks. The archives
here are written by an independent newc writer (below, from the format's definition), and hostile ones
must fail with an `EifError` naming the EIF, never another exception or a read past the ramdisk."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaver_rules.eif.files import find_file
from enclaver_rules.eif.format import SECTION_KERNEL, SECTION_RAMDISK, EifError, SectionSource, read_eif, write_eif

MANIFEST = b"version: v1\nname: app\n"


def newc(name: str, body: bytes = b"", mode: int = 0o100644, *, namesize: int | None = None,
         filesize: int | None = None) -> bytes:
    """One newc entry: 110-byte header, name + NUL padded to 4, body padded to 4 (offsets from 0)."""
    raw = name.encode() + b"\0"
    fields = [1, mode, 0, 0, 1, 0, len(body) if filesize is None else filesize, 0, 0, 0, 0,
              len(raw) if namesize is None else namesize, 0]
    head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + raw
    head += b"\0" * (-len(head) % 4)
    return head + body + b"\0" * (-len(body) % 4)


def archive(*entries: bytes) -> bytes:
    return b"".join(entries) + newc("TRAILER!!!", mode=0)


def eif_with(tmp_path: Path, ramdisk: bytes, boot: bytes = b"") -> Path:
    sections = [(SECTION_KERNEL, b"kernel"), (SECTION_RAMDISK, boot or archive(newc("init", b"x"))),
                (SECTION_RAMDISK, ramdisk)]
    path = tmp_path / "x.eif"
    with open(path, "wb") as f:
        write_eif(f, "x86_64", [SectionSource(k, len(d), functools.partial(iter, [d])) for k, d in sections])
    return path


def find(path: Path, name: str = "rootfs/etc/enclaver/enclaver.yaml", limit: int = 1 << 20) -> bytes | None:
    return find_file(read_eif(str(path)), name, limit)


def test_finds_the_file_among_others(tmp_path: Path) -> None:
    ramdisk = archive(newc("rootfs", mode=0o40755), newc("rootfs/bin/app", b"\x7fELF" * 1000, 0o100755),
                      newc("rootfs/etc/enclaver/enclaver.yaml", MANIFEST), newc("cmd", b"/bin/app"))
    assert find(eif_with(tmp_path, ramdisk)) == MANIFEST


def test_only_the_customer_ramdisk_counts_and_a_missing_file_is_none(tmp_path: Path) -> None:
    boot = archive(newc("rootfs/etc/enclaver/enclaver.yaml", b"planted in the boot ramdisk"))
    assert find(eif_with(tmp_path, archive(newc("rootfs/bin/app", b"x")), boot)) is None


def test_the_last_copy_wins_as_when_the_kernel_unpacks(tmp_path: Path) -> None:
    ramdisk = archive(newc("rootfs/etc/enclaver/enclaver.yaml", b"first"),
                      newc("rootfs/etc/enclaver/enclaver.yaml", MANIFEST))
    assert find(eif_with(tmp_path, ramdisk)) == MANIFEST


@pytest.mark.parametrize("ramdisk, why", [
    (archive(newc("rootfs/etc/enclaver/enclaver.yaml", b"x" * 100)), "more than the 64 allowed"),
    (archive(newc("rootfs/etc/enclaver/enclaver.yaml", mode=0o120777, body=b"/etc/shadow")), "not a regular file"),
    (newc("rootfs/a", b"x"), "without its trailer"),
    (b"070702" + b"0" * 200, "not a newc cpio header"),
    (b"070701" + b"zz" * 52 + b"\0" * 40, "not hexadecimal"),
    (newc("rootfs/a", b"x", namesize=0) + b"\0" * 200, "a name of 0 bytes"),
    (newc("rootfs/a", b"x", namesize=1 << 20) + b"\0" * 200, "a name of"),
    (newc("rootfs/a", b"x", filesize=0xFFFFFFFF), "past the ramdisk's end"),
    (newc("rootfs/a", b"x", namesize=3) + b"\0" * 200, "not NUL-terminated"),
])
def test_hostile_archives_are_refused_naming_the_eif(tmp_path: Path, ramdisk: bytes, why: str) -> None:
    path = eif_with(tmp_path, ramdisk)
    with pytest.raises(EifError) as e:
        find(path, limit=64)
    assert why in str(e.value) and str(path) in str(e.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600), st.integers(0, 600))
def test_random_bytes_give_an_eif_error_or_a_bounded_answer(tmp_path: Path, noise: bytes, cut: int) -> None:
    good = archive(newc("rootfs/etc/enclaver/enclaver.yaml", MANIFEST))
    for ramdisk in (noise, good[:cut] + noise, good + noise):
        path = eif_with(tmp_path, ramdisk)
        try:
            found = find(path, limit=128)
        except EifError:
            continue
        assert found is None or len(found) <= 128

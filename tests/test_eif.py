"""EIF: golden bytes worked out from ../shared/reference/eif.md, an independent re-reader, PCR
sensitivity, reproducibility, the customer ramdisk's rules, signing and development blobs.

Expected values here are written from the format notes (field by field) or computed by code in
this file that shares nothing with the builder, never copied from the builder's output.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.eif.build import build_eif
from enclaver_rules.eif.cpio import CpioWriter
from enclaver_rules.eif.describe import describe
from enclaver_rules.eif.format import SectionSource, write_eif
from enclaver_rules.eif.ramdisk import bootstrap
from enclaver_rules.errors import InvalidInput
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import StoredImage, load_stored
from oci_helpers import tar_bytes

MTIME = "58f63f08"  # 1492533000, linuxkit's defaultModTime


def newc(ino: str, mode: str, nlink: str, mtime: str, size: str, namesize: str) -> bytes:
    """One header as eif.md §7 spells it: 13 fields of 8 lowercase hex digits, dev 3:1."""
    return ("070701" + ino + mode + "00000000" + "00000000" + nlink + mtime + size + "00000003" + "00000001"
            + "00000000" + "00000000" + namesize + "00000000").encode()


def test_bootstrap_ramdisk_golden_bytes(tmp_path: Path) -> None:
    (tmp_path / "init").write_bytes(b"INIT")
    (tmp_path / "nsm.ko").write_bytes(b"NSM")
    ramdisk = bootstrap(tmp_path / "init", tmp_path / "nsm.ko")
    expected = (
        newc("000002d1", "000041ed", "00000002", MTIME, "00000000", "00000004") + b"dev\0" + b"\0" * 2
        + newc("000002d2", "000081ed", "00000001", MTIME, "00000004", "00000005") + b"init\0" + b"\0" * 1 + b"INIT"
        + newc("000002d3", "000081ed", "00000001", MTIME, "00000003", "00000007") + b"nsm.ko\0" + b"\0" * 3
        + b"NSM" + b"\0"
        + newc("000002d4", "00000000", "00000001", "00000000", "00000000", "0000000b") + b"TRAILER!!!\0" + b"\0" * 3
    )
    expected += b"\0" * (-len(expected) % 512)
    assert len(expected) == 512
    assert b"".join(ramdisk.stream()) == expected
    assert ramdisk.size == 512


def test_cpio_writer_sink_and_generator_agree() -> None:
    from enclaver_rules.eif.cpio import CpioEntry

    sink = io.BytesIO()
    writer = CpioWriter(sink)
    writer.add(CpioEntry("a", "file", 0o600, size=3), [b"abc"])
    writer.close()
    gen = CpioWriter()
    assert sink.getvalue() == b"".join([*gen.entry(CpioEntry("a", "file", 0o600, size=3), [b"abc"]), *gen.trailer()])
    with pytest.raises(ValueError):
        list(CpioWriter().entry(CpioEntry("a", "file", 0o600, size=3), [b"ab"]))


# -- the EIF container, independently -----------------------------------------------------------


def independent_read(path: Path) -> dict[str, object]:
    """A minimal EIF reader written from eif.md §1–§6 alone: header fields, sections, CRC, PCRs."""
    data = path.read_bytes()
    assert data[:4] == b".eif"
    version, flags = struct.unpack_from(">HH", data, 4)
    count = struct.unpack_from(">H", data, 0x1A)[0]
    offsets = struct.unpack_from(">32Q", data, 0x1C)[:count]
    sizes = struct.unpack_from(">32Q", data, 0x11C)[:count]
    crc = struct.unpack_from(">I", data, 0x220)[0]
    sections = []
    for offset, size in zip(offsets, sizes, strict=True):
        kind, section_flags, length = struct.unpack_from(">HHQ", data, offset)
        assert section_flags == 0 and length == size
        sections.append((kind, data[offset + 12: offset + 12 + size]))
    kernel = b"".join(d for k, d in sections if k == 1)
    cmdline = b"".join(d for k, d in sections if k == 2)
    ramdisks = [d for k, d in sections if k == 3]

    def pcr(content: bytes) -> str:
        return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).hexdigest()

    return {"version": version, "flags": flags, "count": count, "offsets": offsets, "sizes": sizes,
            "crc_ok": zlib.crc32(data[:544] + data[548:]) == crc, "types": [k for k, _ in sections],
            "PCR0": pcr(kernel + cmdline + b"".join(ramdisks)), "PCR1": pcr(kernel + cmdline + ramdisks[0]),
            "PCR2": pcr(b"".join(ramdisks[1:])), "total": len(data)}


def test_eif_container_golden_bytes(tmp_path: Path) -> None:
    parts = [(1, b"KERNEL"), (2, b"console=ttyS0"), (5, b"{}"), (3, b"R0"), (3, b"RAMDISK1")]
    path = tmp_path / "x.eif"
    with open(path, "w+b") as out:
        crc, measurements, size = write_eif(out, "aarch64", [SectionSource(k, len(d), lambda d=d: iter([d]))
                                                             for k, d in parts])
    # built by hand from the §2 table: magic, version 4, flags (aarch64 = 1), 1 GiB, 2 CPUs, reserved, count
    offsets, position = [], 548
    for _, d in parts:
        offsets.append(position)
        position += 12 + len(d)
    header = (b".eif" + (4).to_bytes(2, "big") + (1).to_bytes(2, "big") + (1 << 30).to_bytes(8, "big")
              + (2).to_bytes(8, "big") + b"\0\0" + (5).to_bytes(2, "big")
              + b"".join(o.to_bytes(8, "big") for o in offsets) + b"\0" * 8 * 27
              + b"".join(len(d).to_bytes(8, "big") for _, d in parts) + b"\0" * 8 * 27 + b"\0" * 4)
    body = b"".join(k.to_bytes(2, "big") + b"\0\0" + len(d).to_bytes(8, "big") + d for k, d in parts)
    expected = header + zlib.crc32(header + body).to_bytes(4, "big") + body
    assert path.read_bytes() == expected
    assert (crc, size) == (zlib.crc32(header + body), len(expected))
    ref = independent_read(path)
    assert (measurements.pcr0, measurements.pcr1, measurements.pcr2) == (ref["PCR0"], ref["PCR1"], ref["PCR2"])


# -- building from an image ---------------------------------------------------------------------


def stored_image(root: Path, layers: list[bytes], *, cmd: list[str] | None = None, entrypoint: list[str] | None = None,
                 env: list[str] | None = None, arch: str = "amd64") -> tuple[Store, StoredImage]:
    store = Store(root / "store").init()
    descriptors = []
    diff_ids = []
    for blob in layers:
        digest = store.put_bytes(blob)
        descriptors.append({"mediaType": mt.OCI_LAYER_GZIP if blob[:2] == b"\x1f\x8b" else mt.OCI_LAYER,
                            "digest": str(digest), "size": len(blob)})
        import gzip

        plain = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        diff_ids.append(str(Digest.of(plain)))
    config = canonical_json({"architecture": arch, "os": "linux", "config": {
        "Cmd": cmd, "Entrypoint": entrypoint, "Env": env}, "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    config_digest = store.put_bytes(config)
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": {
        "mediaType": mt.OCI_CONFIG, "digest": str(config_digest), "size": len(config)}, "layers": descriptors})
    digest = store.put_bytes(manifest)
    store.tag("test", Descriptor(mt.OCI_MANIFEST, digest, len(manifest)))
    return store, load_stored(store, "test", digest)


APP = [tar_bytes([("bin", "dir", ""), ("bin/app", "file", "#!/bin/sh\necho hi\n"), ("etc", "dir", ""),
                  ("etc/os-release", "file", "ID=test\n")]),
       tar_bytes([("data", "dir", ""), ("data/table", "file", "x" * 100_000)])]


@pytest.fixture
def blobs(tmp_path: Path):  # type: ignore[no-untyped-def]
    return write_dev_blobs(tmp_path / "blobs", "x86_64")


def test_build_then_read_back_independently(tmp_path: Path, blobs) -> None:  # type: ignore[no-untyped-def]
    store, image = stored_image(tmp_path, APP, cmd=["/bin/app"], env=["A=1"])
    result = build_eif(image, store, blobs, tmp_path / "app.eif")
    ref = independent_read(tmp_path / "app.eif")
    assert ref["crc_ok"] and ref["version"] == 4 and ref["flags"] == 0 and ref["types"] == [1, 2, 5, 3, 3]
    assert ref["total"] == result.size == (tmp_path / "app.eif").stat().st_size
    m = result.measurements
    assert (m.pcr0, m.pcr1, m.pcr2) == (ref["PCR0"], ref["PCR1"], ref["PCR2"])
    info = describe(str(tmp_path / "app.eif"))
    assert info["Measurements"] == {"HashAlgorithm": "Sha384 { ... }", "PCR0": m.pcr0, "PCR1": m.pcr1,
                                    "PCR2": m.pcr2}
    assert info["CheckCRC"] is True and info["IsSigned"] is False
    assert info["Metadata"]["enclaver"]["development"] is True
    cmdline = (tmp_path / "blobs" / "cmdline").read_text().strip().encode()
    assert info["Sections"][1] == {"Type": "cmdline", "Offset": 548 + 12 + blobs.kernel.stat().st_size,
                                   "Size": len(cmdline)}


def test_pcrs_change_exactly_with_their_inputs(tmp_path: Path) -> None:
    base_blobs = write_dev_blobs(tmp_path / "b1", "x86_64")
    store, image = stored_image(tmp_path / "i1", APP, cmd=["/bin/app"])
    first = build_eif(image, store, base_blobs, tmp_path / "1.eif").measurements
    # same image, other image name (metadata only): no PCR moves
    renamed = build_eif(image, store, base_blobs, tmp_path / "2.eif", image_name="other").measurements
    assert renamed == first
    # a changed app file: PCR0 and PCR2 move, PCR1 does not
    store2, image2 = stored_image(tmp_path / "i2", [APP[0], tar_bytes([("data/table", "file", "y" * 100_000)])],
                                  cmd=["/bin/app"])
    changed = build_eif(image2, store2, base_blobs, tmp_path / "3.eif").measurements
    assert (changed.pcr0 != first.pcr0, changed.pcr1 == first.pcr1, changed.pcr2 != first.pcr2) == (True, True, True)
    # another command: only the customer ramdisk's cmd file changes
    store3, image3 = stored_image(tmp_path / "i3", APP, cmd=["/bin/app", "--verbose"])
    other_cmd = build_eif(image3, store3, base_blobs, tmp_path / "4.eif").measurements
    assert other_cmd.pcr1 == first.pcr1 and other_cmd.pcr2 != first.pcr2
    # another kernel: PCR0 and PCR1 move, PCR2 does not
    kernel = tmp_path / "b1" / "bzImage"
    os.chmod(kernel, 0o644)
    kernel.write_bytes(kernel.read_bytes() + b"!")
    from enclaver_rules.eif.blobs import load_blobs

    other_kernel = build_eif(image, store, load_blobs(tmp_path / "b1", "x86_64"), tmp_path / "5.eif").measurements
    assert other_kernel.pcr0 != first.pcr0 and other_kernel.pcr1 != first.pcr1 and other_kernel.pcr2 == first.pcr2


BUILD_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_eif import APP, stored_image
from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.eif.build import build_eif
root = Path.cwd()
store, image = stored_image(root, APP, cmd=["/bin/app"], env=["TZ_TEST=1"])
build_eif(image, store, write_dev_blobs(root / "blobs", "x86_64"), root / "app.eif", epoch=1700000000)
"""


def test_identical_bytes_across_directories_umasks_and_time_zones(tmp_path: Path) -> None:
    digests = set()
    for i, (umask, tz) in enumerate((("0022", "UTC"), ("0077", "Pacific/Chatham"), ("0002", "America/Caracas"))):
        work = tmp_path / f"dir-{i}" / ("deeper/" * i)
        work.mkdir(parents=True)
        script = BUILD_SCRIPT.format(tests=str(Path(__file__).parent))
        subprocess.run(["sh", "-c", f'umask {umask}; exec "$0" -c "$1"', sys.executable, script], cwd=work,
                       env={**os.environ, "TZ": tz}, check=True, timeout=120)
        digests.add(hashlib.sha256((work / "app.eif").read_bytes()).hexdigest())
    assert len(digests) == 1


# -- the customer ramdisk, read back with an independent newc parser ------------------------------


def read_newc(data: bytes) -> list[dict[str, object]]:
    entries, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701", pos
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, size = fields[11], fields[6]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos: pos + size]
        pos += size + (-(pos + size) % 4)
        if name == "TRAILER!!!":
            assert len(data) % 512 == 0 and not data[pos:].strip(b"\0")
            return entries
        entries.append({"name": name, "ino": fields[0], "mode": fields[1], "uid": fields[2], "gid": fields[3],
                        "nlink": fields[4], "mtime": fields[5], "data": body, "rdev": (fields[9], fields[10])})


def customer_entries(tmp_path: Path, layers: list[bytes], **config: object) -> list[dict[str, object]]:
    store, image = stored_image(tmp_path, layers, **config)  # type: ignore[arg-type]
    blobs = write_dev_blobs(tmp_path / "blobs", "x86_64")
    build_eif(image, store, blobs, tmp_path / "x.eif")
    eif = independent_read(tmp_path / "x.eif")
    data = (tmp_path / "x.eif").read_bytes()
    offset = eif["offsets"][4]  # type: ignore[index]
    return read_newc(data[offset + 12: offset + 12 + eif["sizes"][4]])  # type: ignore[index]


def test_customer_ramdisk_follows_nitro_cli(tmp_path: Path) -> None:
    layers = [
        tar_bytes([("a", "dir", ""), ("a/b", "file", "ab"), ("a-b", "file", "a-b"), ("etc", "dir", ""),
                   ("etc/hosts", "file", "10.0.0.1 evil\n"), ("etc/hostname", "file", "box"),
                   ("usr/bin/tool", "file", "T"), ("usr/bin/alias", "hardlink", "usr/bin/tool"),
                   ("Dockerfile", "file", "FROM x"), ("dev/null", "chardev", "")]),
        tar_bytes([("a/.wh.b", "file", ""), ("gone.txt", "file", "g")]),
    ]
    entries = customer_entries(tmp_path, layers, entrypoint=["/usr/bin/tool", "--flag"], env=["PATH=/bin", "X=1"])
    names = [e["name"] for e in entries]
    by_name = {e["name"]: e for e in entries}
    assert names[0] == "rootfs" and names[-9:] == ["rootfs", "rootfs/dev", "rootfs/run", "rootfs/sys", "rootfs/var",
                                                  "rootfs/proc", "rootfs/tmp", "cmd", "env"]
    # WalkDir order: each directory's children sorted, depth first ("a/" and its subtree before "a-b")
    assert names.index("rootfs/a/") < names.index("rootfs/a-b") and "rootfs/a/b" not in names  # whited out
    # excluded by linuxkit; dev/pts/ and dev/shm/ stay (their export names end in '/')
    for gone in ("rootfs/Dockerfile", "rootfs/.dockerenv", "rootfs/etc/hostname", "rootfs/dev/console"):
        assert gone not in names
    assert "rootfs/dev/pts/" in names and "rootfs/dev/shm/" in names and "rootfs/proc/" in names
    assert by_name["rootfs/etc/hosts"]["data"].startswith(b"127.0.0.1       localhost\n")  # type: ignore[union-attr]
    resolv = by_name["rootfs/etc/resolv.conf"]
    assert resolv["mode"] & 0o170000 == 0o120000 and resolv["data"] == b"/run/resolvconf/resolv.conf"
    assert by_name["rootfs/etc/mtab"]["data"] == b"/proc/mounts"
    # docker export emits an inode's first path in walk order as the file ("alias" < "tool") and the
    # later ones as hard links, which linuxkit turns into symlinks relative to their own directory
    assert by_name["rootfs/usr/bin/alias"]["mode"] & 0o170000 == 0o100000
    assert by_name["rootfs/usr/bin/alias"]["data"] == b"T"
    tool = by_name["rootfs/usr/bin/tool"]
    assert tool["mode"] & 0o170000 == 0o120000 and tool["data"] == b"alias"
    assert by_name["rootfs/dev/null"]["rdev"] == (1, 3)
    for name in ("rootfs/dev/", "rootfs/etc/", "rootfs/proc/", "rootfs/sys/", "rootfs/etc/hosts", "cmd", "env"):
        assert by_name[name]["mtime"] == 1492533000, name
    assert by_name["rootfs/etc/"]["mode"] == 0o040755 and by_name["rootfs/etc/"]["uid"] == 0
    assert by_name["cmd"]["data"] == b"/usr/bin/tool\n--flag\n" and by_name["env"]["data"] == b"PATH=/bin\nX=1\n"
    assert [e["ino"] for e in entries] == list(range(721, 721 + len(entries)))


#: Directory modes and owners that ordinary images carry at the init layer's paths (Debian and
#: Ubuntu ship `proc` and `sys` as 0555), plus ones no image should need but any image may have.
ODD_INIT_DIRS = [("proc", "dir", "", {"mode": 0o555}), ("sys", "dir", "", {"mode": 0o555}),
                 ("etc", "dir", "", {"mode": 0o700, "uid": 1000, "gid": 1001}),
                 ("etc/hosts", "file", "10.9.9.9 evil\n", {"mode": 0o600, "uid": 1000}),
                 ("dev", "dir", "", {"mode": 0o750, "uid": 7, "gid": 8}),
                 ("dev/shm", "dir", "", {"mode": 0o1777}),
                 ("dev/console", "chardev", ""),
                 ("bin", "dir", ""), ("bin/app", "file", "#!/bin/sh\n")]


def test_init_layer_keeps_the_image_directories_attributes(tmp_path: Path) -> None:
    """eif.md §8 (CONFIRMED with a real dockerd): a directory the image has keeps its mode and owner;
    what the init layer creates is 0755 root; its files replace the image's own, 0755 root; the
    `touch` list only forces mtimes. Regression: the builder used to reset them all to 0755 root."""
    entries = customer_entries(tmp_path, [tar_bytes(ODD_INIT_DIRS)], cmd=["/bin/app"])
    by_name = {e["name"]: e for e in entries}

    def attrs(name: str) -> tuple[object, ...]:
        e = by_name[name]
        return e["mode"], e["uid"], e["gid"], e["mtime"]

    assert attrs("rootfs/proc/") == (0o040555, 0, 0, 1492533000)
    assert attrs("rootfs/sys/") == (0o040555, 0, 0, 1492533000)
    assert attrs("rootfs/etc/") == (0o040700, 1000, 1001, 1492533000)
    assert attrs("rootfs/dev/") == (0o040750, 7, 8, 1492533000)
    assert attrs("rootfs/dev/shm/") == (0o041777, 0, 0, 1492533000)
    assert attrs("rootfs/dev/pts/") == (0o040755, 0, 0, 1492533000)  # not in the image: created
    # the init layer's files are unlinked and recreated (0755 root) even when the image ships them
    assert attrs("rootfs/etc/hosts") == (0o100755, 0, 0, 1492533000)
    assert "rootfs/dev/console" not in by_name  # recreated as a file, then dropped by linuxkit


def test_init_layer_replaces_what_is_not_a_directory(tmp_path: Path) -> None:
    """unlink(2) removes a symlink or file on an init path's way, and the init layer then makes a
    0755 root directory there: an image's `etc` → elsewhere symlink is not followed."""
    layers = [tar_bytes([("private", "dir", ""), ("private/etc", "dir", "", {"mode": 0o700}),
                         ("private/etc/passwd", "file", "root:x:0:0::/:/bin/sh\n"),
                         ("etc", "symlink", "private/etc"), ("proc", "file", "not a dir"),
                         ("sys", "symlink", "/nowhere"), ("bin", "dir", ""), ("bin/app", "file", "A")])]
    entries = customer_entries(tmp_path, layers, cmd=["/bin/app"])
    by_name = {e["name"]: e for e in entries}
    for name in ("rootfs/etc/", "rootfs/proc/", "rootfs/sys/"):
        assert (by_name[name]["mode"], by_name[name]["uid"]) == (0o040755, 0), name
    assert "rootfs/private/etc/hosts" not in by_name and "rootfs/etc/passwd" not in by_name
    assert by_name["rootfs/private/etc/"]["mode"] == 0o040700


def test_cmd_wins_over_entrypoint_and_one_is_needed(tmp_path: Path) -> None:
    entries = customer_entries(tmp_path / "a", APP, cmd=["/bin/app"], entrypoint=["/bin/ignored"])
    assert next(e for e in entries if e["name"] == "cmd")["data"] == b"/bin/app\n"
    store, image = stored_image(tmp_path / "b", APP)
    with pytest.raises(InvalidInput, match="neither Cmd nor Entrypoint"):
        build_eif(image, store, write_dev_blobs(tmp_path / "bl", "x86_64"), tmp_path / "b.eif")


def test_architecture_comes_from_the_image(tmp_path: Path) -> None:
    store, image = stored_image(tmp_path, APP, cmd=["/bin/app"], arch="arm64")
    with pytest.raises(InvalidInput, match="the image is aarch64 but the blob set"):
        build_eif(image, store, write_dev_blobs(tmp_path / "x86", "x86_64"), tmp_path / "a.eif")
    build_eif(image, store, write_dev_blobs(tmp_path / "arm", "aarch64"), tmp_path / "a.eif")
    assert independent_read(tmp_path / "a.eif")["flags"] == 1


# -- signing -------------------------------------------------------------------------------------


def _signing_material(tmp_path: Path, curve: str = "secp384r1") -> tuple[Path, Path, bytes]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1() if curve == "secp384r1" else ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclaver test signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA384()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem", cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("curve", ["secp384r1", "secp256r1"])
def test_signed_eif_has_pcr8_and_verifies(tmp_path: Path, blobs, curve: str) -> None:  # type: ignore[no-untyped-def]
    import cbor2

    from enclaver_rules.eif.sign import Signer

    cert, key, der = _signing_material(tmp_path, curve)
    store, image = stored_image(tmp_path, APP, cmd=["/bin/app"])
    unsigned = build_eif(image, store, blobs, tmp_path / "u.eif").measurements
    signed = build_eif(image, store, blobs, tmp_path / "s.eif", signer=Signer.load(cert, key)).measurements
    assert (signed.pcr0, signed.pcr1, signed.pcr2) == (unsigned.pcr0, unsigned.pcr1, unsigned.pcr2)
    assert signed.pcr8 == hashlib.sha384(b"\0" * 48 + hashlib.sha384(der).digest()).hexdigest()
    info = describe(str(tmp_path / "s.eif"))
    assert info["IsSigned"] and info["SignatureCheck"] and info["Measurements"]["PCR8"] == signed.pcr8
    ref = independent_read(tmp_path / "s.eif")
    assert ref["types"] == [1, 2, 5, 3, 3, 4] and ref["crc_ok"]
    # the section is serde_cbor's encoding: byte vectors as arrays of unsigned integers
    data = (tmp_path / "s.eif").read_bytes()
    section = data[ref["offsets"][5] + 12:]  # type: ignore[index]
    [entry] = cbor2.loads(section)
    assert list(entry) == ["signing_certificate", "signature"]
    assert bytes(entry["signing_certificate"]) == cert.read_bytes()
    protected, unprotected, payload, _ = cbor2.loads(bytes(entry["signature"]))
    assert cbor2.loads(protected) == {1: -35 if curve == "secp384r1" else -7} and unprotected == {}
    assert cbor2.loads(payload) == {"register_index": 0, "register_value": list(bytes.fromhex(signed.pcr0))}


def test_tampered_eif_fails_crc_and_signature(tmp_path: Path, blobs) -> None:  # type: ignore[no-untyped-def]
    from enclaver_rules.eif.sign import Signer

    cert, key, _ = _signing_material(tmp_path)
    store, image = stored_image(tmp_path, APP, cmd=["/bin/app"])
    build_eif(image, store, blobs, tmp_path / "s.eif", signer=Signer.load(cert, key))
    data = bytearray((tmp_path / "s.eif").read_bytes())
    ref = independent_read(tmp_path / "s.eif")
    data[ref["offsets"][4] + 12 + 200] ^= 1  # type: ignore[index]  # one bit in the customer ramdisk
    (tmp_path / "t.eif").write_bytes(bytes(data))
    info = describe(str(tmp_path / "t.eif"))
    assert info["CheckCRC"] is False and info["SignatureCheck"] is False
    from enclaver_rules.errors import OperationFailed
    from enclaver_rules.runtime.runnable import eif_facts

    assert eif_facts(tmp_path / "s.eif")[0]["PCR0"]  # the untouched one is read
    with pytest.raises(OperationFailed) as refused:  # `enclaver run` refuses it before anything starts
        eif_facts(tmp_path / "t.eif", "t.eif")
    assert str(refused.value.diagnostics[0]).startswith("t.eif: the EIF's CRC32 does not match its contents")


def test_a_release_images_pcr_labels_must_be_what_its_eif_measures() -> None:
    """`enclaver run IMAGE` reads the PCRs from the EIF; labels that say otherwise (relabelled, or the
    EIF replaced) are refused, naming each PCR; labels without PCRs (other tools' images) say nothing."""
    from enclaver_rules.errors import OperationFailed
    from enclaver_rules.runtime.runnable import _check_labels

    measured = {"PCR0": "aa" * 48, "PCR1": "bb" * 48, "PCR2": "cc" * 48}
    labels = {"dev.enclaver.version": "1", "dev.enclaver.pcr0": "AA" * 48, "dev.enclaver.pcr1": "bb" * 48}
    _check_labels("img", labels, measured)  # case does not matter
    _check_labels("img", {"dev.enclaver.version": "1"}, measured)
    with pytest.raises(OperationFailed) as refused:
        _check_labels("img", {**labels, "dev.enclaver.pcr2": "dd" * 48, "dev.enclaver.pcr8": "ee" * 48}, measured)
    assert str(refused.value.diagnostics[0]).startswith(
        f"img: its labels and its EIF disagree: PCR2 labelled {'dd' * 48} but measured {'cc' * 48}; PCR8 labelled "
        f"{'ee' * 48} but measured absent — do not run it")


def test_signing_material_is_checked(tmp_path: Path) -> None:
    from enclaver_rules.eif.sign import Signer

    cert, _, _ = _signing_material(tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    _, other_key, _ = _signing_material(tmp_path / "b" if (tmp_path / "b").mkdir() is None else tmp_path)
    with pytest.raises(InvalidInput, match="does not belong to the certificate"):
        Signer.load(cert, other_key)
    with pytest.raises(InvalidInput, match="not a PEM certificate"):
        Signer.load(other_key, other_key)


def test_development_blobs_are_deterministic_and_marked(tmp_path: Path) -> None:
    a = write_dev_blobs(tmp_path / "a", "x86_64")
    b = write_dev_blobs(tmp_path / "b", "x86_64")
    assert a.digest == b.digest and a.development
    assert json.loads((tmp_path / "a" / "enclaver-blobs.json").read_text())["development"] is True
    assert (tmp_path / "a" / "cmdline").read_text().strip() == (
        "reboot=k panic=30 pci=off nomodules console=ttyS0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd "
        "random.trust_cpu=on")
    assert write_dev_blobs(tmp_path / "c", "aarch64").digest != a.digest


def test_blob_digest_is_enforced(tmp_path: Path) -> None:
    from enclaver_rules.eif.blobs import load_blobs

    blobs = write_dev_blobs(tmp_path / "b", "x86_64")
    assert load_blobs(tmp_path / "b", "x86_64", expect=blobs.digest).digest == blobs.digest
    with pytest.raises(InvalidInput, match="blob set digest is"):
        load_blobs(tmp_path / "b", "x86_64", expect=Digest.of(b"other"))
    with pytest.raises(InvalidInput, match="missing Image for aarch64"):
        load_blobs(tmp_path / "b", "aarch64")


def test_eif_commands(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    make_layout(str(tmp_path / "layout"), "v", [[Entry.file("bin/app", b"app", 0o755)]], cmd=("/bin/app",))
    assert cli("blobs", "dev", "-o", str(tmp_path / "blobs")).code == 0
    result = cli("eif", "build", "--image", f"oci:{tmp_path / 'layout'}:v", "--blobs", str(tmp_path / "blobs"),
                 "-o", str(tmp_path / "app.eif"), "--cache-dir", str(tmp_path / "cache"), "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert set(doc["Measurements"]) == {"HashAlgorithm", "PCR0", "PCR1", "PCR2"} and doc["development"] is True
    assert "development blob set" in result.stderr
    described = cli("eif", "describe", str(tmp_path / "app.eif"), "--json").json()
    assert described["Measurements"] == doc["Measurements"] and described["CheckCRC"] is True
    bad = cli("eif", "describe", str(tmp_path / "blobs" / "cmdline"))
    assert bad.code == 1 and "not a valid EIF" in bad.stderr


def test_manifest_chooses_build_settings_and_flags_win(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    make_layout(str(tmp_path / "layout"), "v", [[Entry.file("bin/app", b"app", 0o755)]], cmd=("/bin/app",))
    write_dev_blobs(tmp_path / "dev-blobs", "x86_64")
    manifest = tmp_path / "enclaver.yaml"
    manifest.write_text("version: v1\nname: app\ntarget: t\nsources: {app: a}\n"
                        "build:\n  backend: pure\n  blobs: dev-blobs\n")
    args = ["eif", "build", "--image", f"oci:{tmp_path / 'layout'}:v", "-o", str(tmp_path / "a.eif"),
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    result = cli(*args, "-f", str(manifest))  # blobs relative to the manifest
    assert result.code == 0, result.stderr
    assert result.json()["blobs"]["path"] == str(tmp_path / "dev-blobs")
    manifest.write_text(manifest.read_text().replace("backend: pure", "backend: docker"))
    bad = cli("manifest", "check", str(manifest))
    assert bad.code == 2 and "build.backend: 'docker' is not one of: pure, nitro-cli" in bad.stdout


def test_blob_set_carried_by_an_image(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    dev = write_dev_blobs(tmp_path / "dev", "x86_64")
    files = [Entry.file(f"blobs/{p.name}", p.read_bytes()) for p in sorted((tmp_path / "dev").iterdir())]
    make_layout(str(tmp_path / "blob-image"), "v", [files], cmd=("/none",))
    make_layout(str(tmp_path / "layout"), "v", [[Entry.file("bin/app", b"app", 0o755)]], cmd=("/bin/app",))
    common = ["eif", "build", "--image", f"oci:{tmp_path / 'layout'}:v", "--blobs", f"oci:{tmp_path / 'blob-image'}:v",
              "-o", str(tmp_path / "a.eif"), "--cache-dir", str(tmp_path / "cache"), "--json"]
    result = cli(*common, "--blobs-digest", str(dev.digest))
    assert result.code == 0, result.stderr
    assert result.json()["blobs"]["digest"] == str(dev.digest)  # the same files, the same digest
    wrong = cli(*common, "--blobs-digest", str(Digest.of(b"x")))
    assert wrong.code == 2 and "blob set digest is" in wrong.stderr

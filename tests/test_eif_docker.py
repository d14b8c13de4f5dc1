"""The engine-free customer ramdisk against a real `docker create` + `docker export`.

nitro-cli's PCR2 comes from linuxkit reading `docker export`. Here the same image is loaded into
a real dockerd, exported, and passed through linuxkit's rules as this test restates them from
linuxkit's moby/build/image.go and initrd/initrd.go (with the nitro bootstrap's patches); the
entry list must equal what our builder wrote without any engine. The test dockerd uses the vfs
storage driver; production engines mostly use overlay2 (see the closing note).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import docker
import pytest
from test_eif import ODD_INIT_DIRS, customer_entries, read_newc, stored_image

from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.eif.build import build_eif
from enclaver_rules.oci.engine import Engine
from enclaver_rules.oci.transfer import docker_archive
from oci_helpers import tar_bytes

pytestmark = pytest.mark.services

LINUXKIT_MTIME = 1492533000
EXCLUDE = {".dockerenv", "Dockerfile", "dev/console", "dev/pts", "dev/shm", "etc/hostname"}
TOUCH = {"dev/", "dev/pts/", "dev/shm/", "etc/", "etc/mtab", "etc/resolv.conf", "etc/hosts", "proc/", "sys/"}
TYPE = {tarfile.DIRTYPE: 0o040000, tarfile.REGTYPE: 0o100000, tarfile.AREGTYPE: 0o100000, tarfile.SYMTYPE: 0o120000,
        tarfile.LNKTYPE: 0o120000, tarfile.CHRTYPE: 0o020000, tarfile.BLKTYPE: 0o060000, tarfile.FIFOTYPE: 0o010000}


def raw_name(export: bytes, m: tarfile.TarInfo) -> str:
    """The name as written (Python's tarfile drops a directory's trailing '/', which matters here)."""
    if "path" in m.pax_headers:
        return m.pax_headers["path"]
    header = export[m.offset: m.offset + 512]
    name = header[0:100].rstrip(b"\0").decode()
    prefix = header[345:500].rstrip(b"\0").decode() if header[257:263] == b"ustar\x00" else ""
    return f"{prefix}/{name}" if prefix else name


def linuxkit_view(export: bytes) -> list[tuple[object, ...]]:
    """(name, mode, uid, gid, mtime, data) per entry, as linuxkit would write them under rootfs/."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(export)) as tar:
        for m in tar:
            name = raw_name(export, m)
            if name in EXCLUDE:
                continue
            mtime = LINUXKIT_MTIME if name in TOUCH or name in ("etc/hosts", "etc/resolv.conf") else int(m.mtime)
            mode = (m.mode & 0o7777) | TYPE[m.type]
            if name == "etc/hosts":
                data = (b"127.0.0.1       localhost\n::1     localhost ip6-localhost ip6-loopback\nfe00::0 "
                        b"ip6-localnet\nff00::0 ip6-mcastprefix\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n")
                mode = (m.mode & 0o7777) | 0o100000
            elif name == "etc/resolv.conf":
                data, mode = b"/run/resolvconf/resolv.conf", (m.mode & 0o7777) | 0o120000
            elif m.islnk():
                data = os.path.relpath("rootfs/" + m.linkname, os.path.dirname("rootfs/" + name)).encode()
            elif m.issym():
                data = m.linkname.encode()
            elif m.isfile():
                f = tar.extractfile(m)
                data = f.read() if f else b""
            else:
                data = b""
            out.append(("rootfs/" + name, mode, m.uid, m.gid, mtime, data))
    return out


def test_customer_ramdisk_equals_linuxkit_over_a_real_docker_export(dockerd, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    layers = [
        tar_bytes([("bin", "dir", ""), ("bin/app", "file", "#!/bin/sh\n"), ("bin/zz-link", "hardlink", "bin/app"),
                   ("etc", "dir", ""), ("etc/os-release", "file", "ID=test\n"), ("etc/hosts", "file", "1.2.3.4 x\n"),
                   ("a", "dir", ""), ("a/b", "file", "ab"), ("a/c", "file", "ac"), ("a-b", "file", "sibling"),
                   ("lib", "symlink", "usr/lib"), ("usr", "dir", ""), ("usr/lib", "dir", ""),
                   ("usr/lib/libx.so", "file", "ELF"), ("dev", "dir", ""), ("dev/null", "chardev", "")]),
        tar_bytes([("a", "dir", ""), ("a/.wh.b", "file", ""), ("bin", "dir", ""), ("bin/new", "file", "new")]),
    ]
    assert_same_as_docker(tmp_path, layers, dockerd)


def test_init_layer_directories_keep_the_images_attributes_in_a_real_export(dockerd, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's 0555 proc and sys, a 0700 etc owned by a user, a 0750 dev, a sticky dev/shm; and,
    in a second layer, an image whose `etc` is a symlink and whose `sys` is a file."""
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    assert_same_as_docker(tmp_path / "a", [tar_bytes(ODD_INIT_DIRS)], dockerd, tag="odd-a")
    layers = [tar_bytes([("private", "dir", ""), ("private/etc", "dir", "", {"mode": 0o700}),
                         ("private/etc/passwd", "file", "root:x:0:0::/:/bin/sh\n"), ("etc", "symlink", "private/etc"),
                         ("sys", "file", "not a dir"), ("proc", "dir", "", {"mode": 0o555, "uid": 3}),
                         ("bin", "dir", ""), ("bin/app", "file", "A")])]
    assert_same_as_docker(tmp_path / "b", layers, dockerd, tag="odd-b")


def assert_same_as_docker(tmp_path: Path, layers: list[bytes], dockerd, tag: str = "1") -> None:  # type: ignore[no-untyped-def]
    """The customer ramdisk we build without an engine equals linuxkit's view of `docker export`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    store, image = stored_image(tmp_path, layers, cmd=["/bin/app"], env=["A=1"])
    Engine().load(docker_archive(image, store, f"enclaver-test/export:{tag}"))
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        container = client.containers.create(f"enclaver-test/export:{tag}", network_mode="none")
        try:
            export = b"".join(container.export())
        finally:
            container.remove()
    finally:
        client.close()
    expected = linuxkit_view(export)

    build_eif(image, store, write_dev_blobs(tmp_path / "blobs", "x86_64"), tmp_path / "x.eif")
    ours = customer_entries_from(tmp_path / "x.eif")
    start = 1  # after the first `rootfs`
    end = next(i for i in range(len(ours) - 1, 0, -1) if ours[i][0] == "rootfs")
    assert [e[0] for e in ours[start:end]] == [e[0] for e in expected]
    assert ours[start:end] == expected


def customer_entries_from(path: Path) -> list[tuple[object, ...]]:
    from test_eif import independent_read

    ref = independent_read(path)
    data = path.read_bytes()
    offset, size = ref["offsets"][4], ref["sizes"][4]  # type: ignore[index]
    return [(e["name"], e["mode"], e["uid"], e["gid"], e["mtime"], e["data"])
            for e in read_newc(data[offset + 12: offset + 12 + size])]


def test_helpers_agree(tmp_path: Path) -> None:
    """customer_entries (test_eif) and customer_entries_from read the same ramdisk."""
    entries = customer_entries(tmp_path, [tar_bytes([("x", "file", "1")])], cmd=["/x"])
    assert [e["name"] for e in entries] == [e[0] for e in customer_entries_from(tmp_path / "x.eif")]

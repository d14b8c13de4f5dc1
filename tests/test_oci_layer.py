"""Deterministic layers and image edits: bytes depend only on content and SOURCE_DATE_EPOCH."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from enclaver_rules.errors import InvalidInput
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.layer import Entry, source_date_epoch, write_layer
from enclaver_rules.oci.model import ImageConfig, Manifest, parse
from enclaver_rules.oci.mutate import ConfigEdit, edit_image

ENTRIES = [Entry.file("etc/enclaver/enclaver.yaml", b"version: v1\n"), Entry.file("sbin/odyn", b"\x7fELF..", 0o755),
           Entry.symlink("bin/sh", "busybox"), Entry.dir("tmp", 0o1777)]

SCRIPT = """
import io, sys, hashlib
from enclaver_rules.oci.layer import Entry, write_layer
entries = [Entry.file("etc/enclaver/enclaver.yaml", b"version: v1\\n"), Entry.file("sbin/odyn", b"\\x7fELF..", 0o755),
           Entry.symlink("bin/sh", "busybox"), Entry.dir("tmp", 0o1777)]
out = io.BytesIO()
write_layer(reversed(entries), out, mtime=1700000000)
print(hashlib.sha256(out.getvalue()).hexdigest())
"""


def test_same_bytes_across_umask_and_timezone() -> None:
    digests = set()
    for umask, tz in (("0022", "UTC"), ("0077", "Asia/Kathmandu"), ("0002", "America/St_Johns")):
        out = subprocess.run(["sh", "-c", f"umask {umask}; exec {sys.executable} -c '{SCRIPT}'"],
                             capture_output=True, text=True, env={"TZ": tz, "PATH": "/usr/bin:/bin"}, check=True)
        digests.add(out.stdout.strip())
    buf = io.BytesIO()
    write_layer(ENTRIES, buf, mtime=1700000000)
    assert digests == {hashlib.sha256(buf.getvalue()).hexdigest()}


def test_layer_headers_are_normalised_and_digests_recompute() -> None:
    buf = io.BytesIO()
    layer = write_layer(ENTRIES, buf, mtime=1700000000)
    blob = buf.getvalue()
    assert blob[:10] == bytes.fromhex("1f8b08000000000000ff")  # no FNAME flag, mtime 0, OS unknown
    assert layer.digest == Digest("sha256", hashlib.sha256(blob).hexdigest()) and layer.size == len(blob)
    plain = gzip.decompress(blob)
    assert layer.diff_id == Digest("sha256", hashlib.sha256(plain).hexdigest())
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["bin", "bin/sh", "etc", "etc/enclaver", "etc/enclaver/enclaver.yaml",
                                         "sbin", "sbin/odyn", "tmp"]
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 1700000000)}
    assert all(not m.pax_headers for m in members)
    assert b"mtime=" not in plain and b"atime=" not in plain


def test_paths_outside_the_image_are_refused() -> None:
    with pytest.raises(ValueError):
        write_layer([Entry.file("../x", b"")], io.BytesIO())


def test_source_date_epoch() -> None:
    assert source_date_epoch({}) == 0
    assert source_date_epoch({"SOURCE_DATE_EPOCH": "1700000000"}) == 1700000000
    with pytest.raises(InvalidInput):
        source_date_epoch({"SOURCE_DATE_EPOCH": "yesterday"})


def _base() -> tuple[Manifest, ImageConfig]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/app"], "Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                      "digest": str(Digest.of(config)), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                       "digest": "sha256:" + "2" * 64, "size": 10}]}).encode()
    m = parse(manifest, None, "t")
    assert isinstance(m, Manifest)
    return m, ImageConfig.parse(config, "t")


def test_edit_appends_layer_and_sets_config() -> None:
    manifest, config = _base()
    layer = write_layer(ENTRIES, io.BytesIO(), mtime=5)
    edited = edit_image(manifest, config, layers=[layer], created=1700000000, edit=ConfigEdit(
        entrypoint=("/sbin/odyn", "--", "/app"), cmd=(), env=(("PATH", "/usr/bin"),), labels=(("a", "b"),)))
    new_config = json.loads(edited.config)
    assert new_config["rootfs"]["diff_ids"] == ["sha256:" + "1" * 64, str(layer.diff_id)]
    assert new_config["config"]["Entrypoint"] == ["/sbin/odyn", "--", "/app"] and new_config["config"]["Cmd"] is None
    assert new_config["config"]["Env"] == ["PATH=/usr/bin"] and new_config["config"]["Labels"] == {"a": "b"}
    assert new_config["created"] == "2023-11-14T22:13:20Z"
    new_manifest = json.loads(edited.manifest)
    assert new_manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert new_manifest["config"]["digest"] == str(Digest.of(edited.config))
    assert [x["mediaType"] for x in new_manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"] * 2
    assert edited.manifest == json.dumps(new_manifest, sort_keys=True, separators=(",", ":")).encode()
    again = edit_image(manifest, config, layers=[layer], created=1700000000, edit=ConfigEdit(
        entrypoint=("/sbin/odyn", "--", "/app"), cmd=(), env=(("PATH", "/usr/bin"),), labels=(("a", "b"),)))
    assert again.manifest_digest == edited.manifest_digest


def test_a_file_backed_entry_writes_the_same_layer_as_bytes(tmp_path: Path) -> None:
    """Large files (an EIF) are streamed from disk; the layer must not depend on how they came."""
    data = os.urandom(3 << 20)
    (tmp_path / "big").write_bytes(data)
    in_memory, streamed = io.BytesIO(), io.BytesIO()
    a = write_layer([Entry.file("enclave/application.eif", data), Entry.file("enclave/x", b"x")], in_memory, mtime=7)
    b = write_layer([Entry.from_file("enclave/application.eif", tmp_path / "big"), Entry.file("enclave/x", b"x")],
                    streamed, mtime=7)
    assert a == b and in_memory.getvalue() == streamed.getvalue()

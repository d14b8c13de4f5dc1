"""`resolve` on a no-op build: unchanged local sources are not hashed again (stamps), a changed one is
always noticed, a stamp that lies cannot get unverified bytes into a build, and a registry tag
costs one HEAD request while it has not moved (enclaver_rules/oci/stamps.py)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclaver_rules.eif import blobs as blobs_module
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci import stamps as stamps_module
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.layer import Entry
from enclaver_rules.oci.model import Manifest
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.reference import Reference
from enclaver_rules.oci.registry import Registry
from enclaver_rules.oci.resolve import Sources, resolve
from enclaver_rules.oci.stamps import Stamps
from enclaver_rules.oci.store import Store, VerifiedBlob
from enclaver_rules.oci.transfer import StoredImage, load_stored, push
from enclaver_rules.rules.common import STAMPS
from enclaver_rules.rules.resolve import resolve_enclave
from oci_helpers import make_layout
from pipeline import doit, ran, summary

EPOCH = "1700000000"


@pytest.fixture
def built(monorepo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The monorepo with alpha built once, and this process set up as doit runs the actions."""
    result = doit(monorepo, "build:alpha")
    assert result.returncode == 0, result.stdout + result.stderr
    monkeypatch.chdir(monorepo)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    return monorepo


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[Any]]]:
    """Every blob opened for reading (store or layout), and every blob-set file hashed."""
    seen: dict[str, list[Any]] = {"opened": [], "blob_set_files": []}
    opened_init = VerifiedBlob.__init__
    read_at = blobs_module._read_at

    def opened(self: VerifiedBlob, path: Path, *args: Any) -> None:
        seen["opened"].append(Path(path))
        opened_init(self, path, *args)

    def hashed(dir_fd: int, name: str, path: Path, **kwargs: Any) -> tuple[str, bytes]:
        seen["blob_set_files"].append(path)
        return read_at(dir_fd, name, path, **kwargs)

    monkeypatch.setattr(VerifiedBlob, "__init__", opened)
    monkeypatch.setattr(blobs_module, "_read_at", hashed)
    yield seen


def _manifest(root: Path, name: str = "alpha") -> str:
    return os.path.realpath(root / "services" / name / "enclaver.yaml")


def _resolve(root: Path, name: str = "alpha") -> dict[str, Any]:
    """resolve:<name>'s action, in this process (so its reads can be counted)."""
    result = resolve_enclave(_manifest(root, name), name, str(root / "cache"))
    assert isinstance(result, dict), result
    return result


def _app_layers(root: Path, name: str = "alpha") -> set[str]:
    resolved = json.loads((root / "cache" / "out" / name / "resolved.json").read_text())
    store = Store(root / "cache")
    node = store.manifest(Digest.parse(resolved["app"]["digest"]))
    assert isinstance(node, Manifest)
    return {d.digest.hex for d in node.layers}


def test_a_no_op_resolve_reads_no_layout_blob_and_hashes_no_blob_set_file(
        built: Path, reads: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stamps_module, "RACY_NS", 0)  # the layout was written seconds ago
    resolved = built / "cache" / "out" / "alpha" / "resolved.json"
    before = (resolved.read_bytes(), resolved.stat().st_mtime_ns)
    _resolve(built)  # records the stamps (if doit's resolve found the layout too fresh to trust)
    record = json.loads((built / "cache" / "out" / "alpha" / STAMPS).read_text())
    assert any(key.startswith("oci:") for key in record["sources"]) and \
        any(key.startswith("blobs:") for key in record["sources"])
    reads["opened"].clear()
    reads["blob_set_files"].clear()

    _resolve(built)

    layout = (built / "services" / "alpha" / "app").resolve()
    assert not [p for p in reads["opened"] if p.is_relative_to(layout)]  # the layout is not read at all
    assert not {p.name for p in reads["opened"]} & _app_layers(built)  # nor the store's copies of its layers
    assert len(reads["opened"]) <= 8  # manifests and configs (app, odyn, sleeve) only: small
    assert reads["blob_set_files"] == []
    assert (resolved.read_bytes(), resolved.stat().st_mtime_ns) == before  # same record, not rewritten


def test_a_file_changed_in_place_with_its_size_and_mtime_kept_is_noticed(
        built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """index.json rewritten in place (same inode, same size, mtime put back): only ctime tells, and
    that is enough: the new image is resolved, not the recorded one."""
    monkeypatch.setattr(stamps_module, "RACY_NS", 0)
    _resolve(built)
    first = json.loads((built / "cache" / "out" / "alpha" / "resolved.json").read_text())["app"]["digest"]
    app = built / "services" / "alpha" / "app"
    other = tmp_path / "other"  # the same image with one byte changed: same sizes everywhere
    make_layout(str(other), "latest", [[Entry.file("bin/app", b"#!/bin/sh\necho alphA\n", 0o755),
                                        Entry.file("etc/motd", b"hello\n")]], cmd=("/bin/app", "--serve"))
    for blob in (other / "blobs" / "sha256").iterdir():
        if not (app / "blobs" / "sha256" / blob.name).exists():
            shutil.copy(blob, app / "blobs" / "sha256" / blob.name)
    index = app / "index.json"
    old, new = index.stat(), (other / "index.json").read_bytes()
    assert len(new) == old.st_size
    with open(index, "r+b") as f:  # in place: the inode stays
        f.write(new)
    os.utime(index, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = index.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (old.st_ino, old.st_size, old.st_mtime_ns)

    second = _resolve(built)["app"]["digest"]

    assert second != first and second == json.loads(new)["manifests"][0]["digest"]


def test_a_layout_blob_changed_in_place_with_its_times_kept_is_an_error_not_the_old_digest(
        built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stamps_module, "RACY_NS", 0)
    _resolve(built)
    app = built / "services" / "alpha" / "app"
    [layer] = _app_layers(built)
    blob = app / "blobs" / "sha256" / layer
    old = blob.stat()
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(blob, "r+b") as f:
        f.write(data)
    os.chmod(blob, old.st_mode)
    os.utime(blob, ns=(old.st_atime_ns, old.st_mtime_ns))

    result = resolve_enclave(_manifest(built), "alpha", str(built / "cache"))

    assert not isinstance(result, dict)
    assert layer in str(result) and "corrupt" in str(result)  # the layout's blob, named
    assert Store(built / "cache").intact(Digest("sha256", layer))  # the store's copy is untouched


def test_touched_files_are_hashed_again_and_nothing_is_rebuilt(built: Path) -> None:
    app = built / "services" / "alpha" / "app"
    for path in app.rglob("*"):  # new times, same bytes: hashed again, same digests, nothing rebuilt
        if path.is_file():
            os.utime(path)
    touched = doit(built, "build:alpha")
    assert touched.returncode == 0, touched.stderr
    assert not ran(touched.stdout, "layer:alpha") and not ran(touched.stdout, "eif:alpha")


def test_a_stamp_that_lies_about_a_damaged_store_blob_is_caught_when_the_eif_step_reads_it(
        built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's copy of the app layer damaged in place, times put back: resolve does not read it
    (the layout's stamps match), so the EIF step does, refuses it, quarantines it and keeps no EIF;
    the next resolve finds it gone and imports the layout again, and the build gives the clean result."""
    monkeypatch.setattr(stamps_module, "RACY_NS", 0)
    _resolve(built)  # stamps recorded
    clean = summary(built, "alpha")
    store = Store(built / "cache")
    [layer] = _app_layers(built)
    path = store.path(Digest("sha256", layer))
    old = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.chmod(path, old.st_mode)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    entries = sorted(p.name for p in (built / "cache" / "out" / "alpha").iterdir() if not p.name.startswith("."))
    assert doit(built, "clean", "eif:alpha").returncode == 0

    refused = doit(built, "build:alpha")

    assert refused.returncode != 0
    assert f"sha256:{layer}" in refused.stdout + refused.stderr and "quarantine" in refused.stdout + refused.stderr
    assert not ran(refused.stdout, "release:alpha")
    out = built / "cache" / "out" / "alpha"
    assert not (out / "latest").exists()  # nothing built from it: no entry, no `latest`
    assert not [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(store.quarantined()) == 1 and not store.has(Digest("sha256", layer))

    healed = doit(built, "build:alpha")
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert summary(built, "alpha")["measurements"] == clean["measurements"]
    assert store.intact(Digest("sha256", layer))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == entries


def test_a_forged_stamp_over_a_changed_layout_builds_the_verified_image_it_recorded(
        built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Who can forge a stamp (ctime too) can make a build use what was verified last time, never the
    new bytes unverified: the store's copy under the recorded digest is what every step reads."""
    monkeypatch.setattr(stamps_module, "RACY_NS", 0)
    _resolve(built)
    clean = summary(built, "alpha")
    app = built / "services" / "alpha" / "app"
    make_layout(str(app.with_name("changed")), "latest", [[Entry.file("bin/app", b"#!/bin/sh\necho other\n", 0o755)]])
    shutil.rmtree(app)
    app.with_name("changed").rename(app)
    record_path = built / "cache" / "out" / "alpha" / STAMPS
    record = json.loads(record_path.read_text())
    for entry in record["sources"].values():  # forge: every recorded stamp says what the files say now
        entry["files"] = [stamps_module.stamp(f[0], follow=entry["follow"]) if len(f) > 1 else f
                          for f in entry["files"]]
    record_path.write_text(json.dumps(record))
    assert doit(built, "clean", "eif:alpha").returncode == 0

    rebuilt = doit(built, "build:alpha")

    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert ran(rebuilt.stdout, "eif:alpha")
    after = summary(built, "alpha")
    assert after["measurements"] == clean["measurements"] and after["inputs"] == clean["inputs"]


def test_a_file_changed_just_before_it_was_stamped_is_not_trusted(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.write_bytes(b"x")
    stamps = Stamps(tmp_path / "record.json")
    stamps.put("fresh", [stamps_module.stamp(fresh)], {"digest": "d"})
    stamps.save()
    assert Stamps(tmp_path / "record.json").get("fresh") is None  # hashed again next time

    old = tmp_path / "old"
    old.write_bytes(b"x")
    later = Stamps(tmp_path / "record.json")
    stamp = stamps_module.stamp(old)
    stamp[5] -= 2 * stamps_module.RACY_NS  # as if stamped well after its last change
    later.put("old", [stamp], {"digest": "d"})
    assert later.get("old") is None  # the stamp no longer matches the file (ctime differs): not reused
    later.put("old", [stamps_module.stamp(old)], {"digest": "d"})  # racy again: not recorded
    assert "old" not in json.loads(json.dumps(later._new))


# -- registry tags ------------------------------------------------------------------------------


def _push_layout(registry_address: str, tmp_path: Path, ref: str, payload: bytes, arch: str = "amd64") -> StoredImage:
    layout = tmp_path / f"layout-{payload.hex()[:8]}"
    make_layout(str(layout), "x", [[Entry.file("data", payload)]], arch=arch)
    src = Store(layout)
    image = load_stored(src, "x", src.resolve("x").digest)  # type: ignore[union-attr]
    push(image, src, Reference.parse(ref), Registry(registry_address))
    return image


@pytest.mark.services
def test_an_unmoved_registry_tag_costs_one_head_and_a_moved_one_is_pulled(
        registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = f"{registry.address}/stamps/app:v1"
    first = str(_push_layout(registry.address, tmp_path, ref, b"first").digest)
    requests: list[tuple[str, str]] = []
    request = Registry.request

    def counted(self: Registry, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        requests.append((method, url.rsplit("/v2/", 1)[-1]))
        return request(self, method, url, *args, **kwargs)

    monkeypatch.setattr(Registry, "request", counted)
    store, record = Store(tmp_path / "cache"), tmp_path / "stamps.json"

    def resolved() -> str:
        stamps = Stamps(record)
        image = resolve(ref, Sources(store, use_engine=False, stamps=stamps))
        stamps.save()
        return str(image.digest)

    assert resolved() == first  # pulled, and recorded
    requests.clear()
    assert resolved() == first
    assert requests == [("HEAD", "stamps/app/manifests/v1")]

    amd = _push_layout(registry.address, tmp_path, ref, b"second")  # the tag moves
    second = str(amd.digest)
    requests.clear()
    assert resolved() == second
    assert requests[0] == ("HEAD", "stamps/app/manifests/v1")
    assert ("GET", "stamps/app/manifests/v1") in requests
    assert dict(store.resolve(str(Reference.parse(ref))).annotations)  # type: ignore[union-attr]
    requests.clear()
    assert resolved() == second and requests == [("HEAD", "stamps/app/manifests/v1")]

    # an index: the tag names the index, the image is the amd64 one, and one HEAD still suffices
    arm = _push_layout(registry.address, tmp_path, f"{registry.address}/stamps/app:arm", b"arm", "arm64")
    Registry(registry.address).put_manifest("stamps/app", "v1", canonical_json({
        "schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
            {**image.manifest.descriptor().to_json(), "platform": {"os": "linux", "architecture": a}}
            for image, a in ((arm, "arm64"), (amd, "amd64"))]}), mt.OCI_INDEX)
    requests.clear()
    assert resolved() == second  # the tag moved to an index: fetched (its amd64 image is already kept)
    assert requests[0] == ("HEAD", "stamps/app/manifests/v1") and len(requests) == 3
    requests.clear()
    assert resolved() == second and requests == [("HEAD", "stamps/app/manifests/v1")]


# -- the EIF entry's stamp ----------------------------------------------------------------------


def _damage_in_place(path: Path) -> None:
    """One byte flipped, in place, with the size and mtime put back (only ctime moves)."""
    old = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = path.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (old.st_ino, old.st_size, old.st_mtime_ns)


def test_an_eif_changed_in_place_with_its_mtime_put_back_is_rebuilt(built: Path) -> None:
    good = summary(built, "alpha")
    _damage_in_place(built / "cache" / "out" / "alpha" / "latest" / "application.eif")
    result = doit(built, "build:alpha")
    assert result.returncode == 0 and ran(result.stdout, "eif:alpha"), result.stdout
    assert summary(built, "alpha")["eif"] == good["eif"]
    again = doit(built, "build:alpha")  # stamped again: quick
    assert again.returncode == 0 and not ran(again.stdout, "eif:alpha")


def test_the_release_step_refuses_an_eif_whose_stamp_lies(built: Path) -> None:
    """The EIF damaged and its recorded stamp forged to match: doit takes the entry as up to date,
    and the release step, which packs the EIF into the release image, checks its bytes first."""
    latest = built / "cache" / "out" / "alpha" / "latest"
    _damage_in_place(latest / "application.eif")
    local = json.loads((latest / "local.json").read_text())
    st = (latest / "application.eif").stat()
    local["stat"] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    (latest / "local.json").write_text(json.dumps(local))
    (latest / "build.json").unlink()  # the release image is made again (as for a new commit)

    result = doit(built, "build:alpha")

    assert result.returncode != 0 and not ran(result.stdout, "eif:alpha")
    assert "is not the EIF its record names" in result.stdout + result.stderr
    assert not (latest / "build.json").exists()


# -- docker-archive: and blob sets, in this process -----------------------------------------------


def test_an_unchanged_docker_archive_is_not_read_again_and_a_touched_one_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from enclaver_rules.oci import transfer

    monkeypatch.setattr(stamps_module, "RACY_NS", 0)
    layout = tmp_path / "layout"
    make_layout(str(layout), "x", [[Entry.file("bin/app", b"#!/bin/sh\necho hi\n", 0o755)]])
    src = Store(layout)
    image = load_stored(src, "x", src.resolve("x").digest)  # type: ignore[union-attr]
    archive = tmp_path / "app.tar"
    archive.write_bytes(b"".join(transfer.docker_archive(image, src, "app:1")))
    imports: list[str] = []
    real = transfer.import_docker_archive

    def counted(stream: Any, store: Store, source: str, **kwargs: Any) -> Any:
        imports.append(source)
        return real(stream, store, source, **kwargs)

    monkeypatch.setattr("enclaver_rules.oci.resolve.import_docker_archive", counted)
    store, record = Store(tmp_path / "cache"), tmp_path / "stamps.json"

    def resolved() -> str:
        stamps = Stamps(record)
        digest = str(resolve(f"docker-archive:{archive}", Sources(store, use_engine=False, stamps=stamps)).digest)
        stamps.save()
        return digest

    first = resolved()
    assert resolved() == first and len(imports) == 1  # the second time: stamps matched, nothing read
    os.utime(archive)
    assert resolved() == first and len(imports) == 2  # touched: read and hashed again, same image
    assert resolved() == first and len(imports) == 2


def test_a_blob_set_file_that_changes_or_appears_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from enclaver_rules.eif.blobs import load_blobs, load_blobs_stamped, write_dev_blobs

    monkeypatch.setattr(stamps_module, "RACY_NS", 0)
    root = tmp_path / "blobs"
    write_dev_blobs(root, "x86_64")
    (root / "nsm.ko").unlink()
    stamps = Stamps(tmp_path / "stamps.json")
    first = load_blobs_stamped(root, "x86_64", stamps)
    hashed: list[str] = []
    read_at = blobs_module._read_at

    def counted(dir_fd: int, name: str, path: Path, **kwargs: Any) -> tuple[str, bytes]:
        hashed.append(name)
        return read_at(dir_fd, name, path, **kwargs)

    monkeypatch.setattr(blobs_module, "_read_at", counted)
    assert load_blobs_stamped(root, "x86_64", stamps) == first and hashed == []

    _damage_in_place(root / "init")  # same size and mtime: ctime tells
    changed = load_blobs_stamped(root, "x86_64", stamps)
    assert changed.digest != first.digest and changed == load_blobs(root, "x86_64")

    (root / "nsm.ko").write_bytes(b"a driver\n")  # a file that was absent appears
    appeared = load_blobs_stamped(root, "x86_64", stamps)
    assert appeared.nsm is not None and appeared == load_blobs(root, "x86_64")

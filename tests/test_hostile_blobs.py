"""Blob sets from hostile images and directories: every byte of a blob set comes from the image's own
layers (or the set's own files), never through a link to the builder's files. `host` stands for
the builder's file system; its canary must never appear in the store, an EIF or the output."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaver_rules.eif import blobs as blobs_module
from enclaver_rules.eif.blobs import load_blobs, write_dev_blobs
from enclaver_rules.errors import EnclaverError, InvalidInput
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import StoredImage, load_stored
from oci_helpers import tar_bytes

CANARY = b"HOST-SECRET-CANARY-" + hashlib.sha256(b"h15a").hexdigest()[:16].encode()
Member = tuple[str, str, bytes | str]


def raw_layout(path: Path, layers: list[bytes], tag: str = "v") -> Digest:
    """An image of exactly these layer blobs (as tar_bytes makes them) in an OCI layout at `path`."""
    store = Store(path).init()
    descriptors, diff_ids = [], []
    for blob in layers:
        plain = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        descriptors.append({"mediaType": mt.OCI_LAYER_GZIP if blob[:2] == b"\x1f\x8b" else mt.OCI_LAYER,
                            "digest": str(store.put_bytes(blob)), "size": len(blob)})
        diff_ids.append(str(Digest.of(plain)))
    config = canonical_json({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/none"]},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    config_digest = store.put_bytes(config)
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                               "config": {"mediaType": mt.OCI_CONFIG, "digest": str(config_digest),
                                          "size": len(config)}, "layers": descriptors})
    digest = store.put_bytes(manifest)
    store.tag(tag, Descriptor(mt.OCI_MANIFEST, digest, len(manifest)))
    return digest


def stored(store_dir: Path, layers: list[bytes]) -> tuple[Store, StoredImage]:
    digest = raw_layout(store_dir, layers)
    store = Store(store_dir)
    return store, load_stored(store, "v", digest)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A development blob set's files, and (under "") its digest as a directory set."""
    where = tmp_path_factory.mktemp("dev") / "set"
    made = write_dev_blobs(where, "x86_64")
    return {**{p.name: p.read_bytes() for p in where.iterdir()}, "": str(made.digest).encode()}


def set_members(dev: dict[str, bytes], at: str, skip: tuple[str, ...] = ()) -> list[Member]:
    prefix = f"{at}/" if at else ""
    return [(f"{prefix}{name}", "file", data) for name, data in sorted(dev.items()) if name and name not in skip]


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """The builder's files: /etc/shadow, and a blob set of its own whose kernel is the canary."""
    host = tmp_path / "host"
    (host / "etc").mkdir(parents=True)
    (host / "etc" / "shadow").write_bytes(CANARY)
    (host / "blobs").mkdir()
    for name in ("bzImage", "cmdline", "init", "nsm.ko"):
        (host / "blobs" / name).write_bytes(CANARY)
    return host


def _leaks(top: Path) -> list[Path]:
    return [p for p in top.rglob("*") if p.is_file() and not p.is_symlink() and CANARY in p.read_bytes()]


def _up(depth: int = 12) -> str:
    return "../" * depth


# -- each attack: (layers with HOST for the host's path), the entry the error must name -----------------

ATTACKS: dict[str, tuple[Callable[[dict[str, bytes]], list[list[Member]]], str]] = {
    "kernel symlink, absolute": (lambda d: [set_members(d, "blobs", ("bzImage",))
                                            + [("blobs/bzImage", "symlink", "HOST/etc/shadow")]], "/blobs/bzImage"),
    "init symlink, relative ..": (lambda d: [set_members(d, "", ("init",))
                                             + [("init", "symlink", _up() + "HOST/etc/shadow")]], "/init"),
    "cmdline hard link to a symlink out": (lambda d: [[("evil", "symlink", "HOST/etc/shadow")]
                                                      + set_members(d, "blobs", ("cmdline",))
                                                      + [("blobs/cmdline", "hardlink", "evil")]], "/blobs/cmdline"),
    "nsm.ko hard link outside": (lambda d: [set_members(d, "blobs", ("nsm.ko",))
                                            + [("blobs/nsm.ko", "hardlink", "../../HOST/etc/shadow")]],
                                 "/blobs/nsm.ko"),
    "kernel hard link inside the image": (lambda d: [[("kernel.bin", "file", d["bzImage"])]
                                                     + set_members(d, "blobs", ("bzImage",))
                                                     + [("blobs/bzImage", "hardlink", "kernel.bin")]],
                                          "/blobs/bzImage"),
    "config symlink": (lambda d: [set_members(d, "blobs", ("bzImage.config",))
                                  + [("blobs/bzImage.config", "symlink", "HOST/etc/shadow")]],
                       "/blobs/bzImage.config"),
    "blobs dir symlink, absolute": (lambda d: [[("blobs", "symlink", "HOST/blobs")]], "/blobs"),
    "nitro dir symlink, relative ..": (lambda d: [[("usr/share/nitro_enclaves", "symlink",
                                                    _up(3) + "HOST")]], "/usr/share/nitro_enclaves"),
    "arch dir symlink": (lambda d: [[("blobs/x86_64", "symlink", "HOST/blobs")]], "/blobs/x86_64"),
    "symlinked parent, then files under it": (lambda d: [[("blobs", "symlink", "HOST/blobs")]
                                                         + set_members(d, "blobs")], "/blobs"),
    "a later layer puts a symlink over the set's dir": (lambda d: [set_members(d, "blobs"),
                                                                   [("blobs", "symlink", "HOST/blobs")]],
                                                        "layer 2 of 2"),
    "a later layer puts a symlink over the kernel": (lambda d: [set_members(d, "blobs"),
                                                                [("blobs/bzImage", "symlink", "HOST/blobs/bzImage")]],
                                                     "layer 2 of 2"),
}


def _layers(members: list[list[Member]], host: Path) -> list[bytes]:
    fill = str(host).lstrip("/")
    return [tar_bytes([(n, k, d.replace("HOST", fill if d.startswith("../") else str(host)) if isinstance(d, str)
                        else d) for n, k, d in layer]) for layer in members]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_links_in_an_image_blob_set_are_refused(tmp_path: Path, host: Path, dev: dict[str, bytes],
                                                attack: str) -> None:
    make, entry = ATTACKS[attack]
    store, image = stored(tmp_path / "store", _layers(make(dev), host))
    with pytest.raises(InvalidInput) as caught:
        blobs_module.load_image_blobs(store, image, "x86_64", ref="oci:hostile")
    message = str(caught.value)
    assert "link" in message and entry in message and "layer " in message, message
    assert caught.value.diagnostics[0].fix and caught.value.diagnostics[0].file == "oci:hostile"
    assert not _leaks(tmp_path / "store")
    assert not list((tmp_path / "store" / "blobs").glob("*.tmp-*"))  # a failure cleans up after itself


def _expect_dev(blobs: object, dev: dict[str, bytes]) -> None:
    assert str(blobs.digest).encode() == dev[""]  # type: ignore[attr-defined]  # the same files, the same digest
    for name in ("bzImage", "cmdline", "init", "nsm.ko"):
        path = getattr(blobs, {"bzImage": "kernel", "nsm.ko": "nsm"}.get(name, name))
        assert not path.is_symlink() and path.read_bytes() == dev[name]


@pytest.mark.parametrize("at", ["", "blobs", "usr/share/nitro_enclaves/blobs", "blobs/x86_64"])
def test_a_plain_blob_set_in_each_place(tmp_path: Path, dev: dict[str, bytes], at: str, host: Path) -> None:
    others = [("bin/sh", "symlink", "busybox"), ("etc", "symlink", str(host / "etc"))]  # links elsewhere: no matter
    store, image = stored(tmp_path / "store", [tar_bytes(others + set_members(dev, at))])
    _expect_dev(blobs_module.load_image_blobs(store, image, "x86_64"), dev)


def test_a_symlink_replaced_by_a_directory_in_a_later_layer(tmp_path: Path, host: Path, dev: dict[str, bytes]) -> None:
    layers = [tar_bytes([("blobs", "symlink", str(host / "blobs"))]),
              tar_bytes([("blobs", "dir", "")] + set_members(dev, "blobs"))]  # type: ignore[operator]
    store, image = stored(tmp_path / "store", layers)
    _expect_dev(blobs_module.load_image_blobs(store, image, "x86_64"), dev)
    assert not _leaks(tmp_path / "store")


def test_whiteouts_and_opaque_directories_apply(tmp_path: Path, dev: dict[str, bytes]) -> None:
    stale = [(n, "file", b"STALE " + n.encode()) for n, _, _ in set_members(dev, "blobs")]
    layers = [tar_bytes(set_members(dev, "", ("nsm.ko",)) + stale + [("blobs/extra", "file", "x")]),  # type: ignore[operator]
              tar_bytes([(".wh.bzImage", "file", ""), ("blobs/.wh..wh..opq", "file", "")]
                        + set_members(dev, "blobs"))]  # type: ignore[operator]
    store, image = stored(tmp_path / "store", layers)
    blobs = blobs_module.load_image_blobs(store, image, "x86_64")  # the root lost its kernel: /blobs, as replaced
    assert blobs.kernel.parent == blobs.root
    _expect_dev(blobs, dev)


def test_a_whiteout_of_the_directory_removes_the_set(tmp_path: Path, dev: dict[str, bytes]) -> None:
    store, image = stored(tmp_path / "store", [tar_bytes(set_members(dev, "blobs")),  # type: ignore[arg-type]
                                               tar_bytes([(".wh.blobs", "file", "")])])
    with pytest.raises(InvalidInput, match="carries no x86_64 blob set"):
        blobs_module.load_image_blobs(store, image, "x86_64")


def test_not_regular_files_and_missing_files_are_named(tmp_path: Path, dev: dict[str, bytes]) -> None:
    store, image = stored(tmp_path / "s1", [tar_bytes(set_members(dev, "blobs", ("init",))  # type: ignore[operator]
                                                      + [("blobs/init", "fifo", "")])])
    with pytest.raises(InvalidInput, match="/blobs/init is not a regular file"):
        blobs_module.load_image_blobs(store, image, "x86_64")
    store, image = stored(tmp_path / "s2", [tar_bytes(set_members(dev, "blobs", ("init",)))])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="/blobs lacks init"):
        blobs_module.load_image_blobs(store, image, "x86_64")


def test_an_oversized_blob_file_is_refused_before_it_is_written(tmp_path: Path, dev: dict[str, bytes],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs_module, "MAX_BLOB_FILE", 1000)
    store, image = stored(tmp_path / "store", [tar_bytes(set_members(dev, "blobs"))])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="more than a blob set file may be"):
        blobs_module.load_image_blobs(store, image, "x86_64")


@pytest.mark.parametrize("name", ["x" * 300, "/".join(["d"] * 1200), "a\0b"])
def test_malformed_names_in_a_blob_image_are_clear(tmp_path: Path, dev: dict[str, bytes], name: str) -> None:
    raw = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("placeholder")
        info.pax_headers = {"path": name}
        tar.addfile(info, io.BytesIO(b""))
    store, image = stored(tmp_path / "store", [tar_bytes(set_members(dev, "blobs")), raw.getvalue()])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        blobs_module.load_image_blobs(store, image, "x86_64")
    assert not list((tmp_path / "store" / "blobs").glob("*.tmp-*"))


def test_the_store_copy_is_reused_and_checked(tmp_path: Path, host: Path, dev: dict[str, bytes]) -> None:
    store, image = stored(tmp_path / "store", [tar_bytes(set_members(dev, "blobs"))])  # type: ignore[arg-type]
    first = blobs_module.load_image_blobs(store, image, "x86_64")
    assert first.root == tmp_path / "store" / "blobs" / f"{image.digest.hex}-x86_64"
    record = json.loads((first.root / ".enclaver-source.json").read_text())
    assert record["entries"]["bzImage"].endswith(": /blobs/bzImage") and record["image"] == str(image.digest)
    # someone swaps the cached kernel for a link to the host: it is not used, the image is read again
    (first.root / "bzImage").unlink()
    (first.root / "bzImage").symlink_to(host / "etc" / "shadow")
    again = blobs_module.load_image_blobs(store, image, "x86_64")
    _expect_dev(again, dev)
    with pytest.raises(InvalidInput, match="blob set digest is"):
        blobs_module.load_image_blobs(store, image, "x86_64", Digest.of(b"other"))


def test_stale_staging_of_our_pid_is_replaced(tmp_path: Path, dev: dict[str, bytes]) -> None:
    store, image = stored(tmp_path / "store", [tar_bytes(set_members(dev, "blobs"))])  # type: ignore[arg-type]
    stale = tmp_path / "store" / "blobs" / f"{image.digest.hex}-x86_64.tmp-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "bzImage").symlink_to("/etc/shadow")
    _expect_dev(blobs_module.load_image_blobs(store, image, "x86_64"), dev)
    assert not stale.exists()


# -- blob sets in directories ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bzImage", "cmdline", "init", "nsm.ko", "bzImage.config", "enclaver-blobs.json"])
@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_a_symlink_in_a_blob_directory_is_refused(tmp_path: Path, host: Path, name: str, how: str) -> None:
    write_dev_blobs(tmp_path / "set", "x86_64")
    (tmp_path / "set" / name).unlink()
    (tmp_path / "set" / name).symlink_to(host / "etc" / "shadow" if how == "absolute" else "../host/etc/shadow")
    with pytest.raises(InvalidInput, match=f"{name} is a symbolic link") as caught:
        load_blobs(tmp_path / "set", "x86_64")
    assert caught.value.diagnostics[0].file == str(tmp_path / "set" / name) and "cp " in caught.value.diagnostics[0].fix


def test_a_blob_directory_reached_through_a_symlink_is_the_users_choice(tmp_path: Path) -> None:
    made = write_dev_blobs(tmp_path / "real", "x86_64")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert load_blobs(tmp_path / "link", "x86_64").digest == made.digest


@pytest.mark.parametrize("case", ["fifo nsm.ko", "cmdline not UTF-8", "marker a list", "cmdline huge"])
def test_malformed_blob_directories_are_clear(tmp_path: Path, case: str) -> None:
    write_dev_blobs(tmp_path / "set", "x86_64")
    if case == "fifo nsm.ko":
        (tmp_path / "set" / "nsm.ko").unlink()
        os.mkfifo(tmp_path / "set" / "nsm.ko")  # must not block either
    elif case == "cmdline not UTF-8":
        (tmp_path / "set" / "cmdline").write_bytes(b"console=\xff\xfe")
    elif case == "marker a list":
        (tmp_path / "set" / "enclaver-blobs.json").write_text("[1]")
    else:
        (tmp_path / "set" / "cmdline").write_bytes(b"x" * (1 << 20))
    with pytest.raises(InvalidInput):
        load_blobs(tmp_path / "set", "x86_64")


# -- the command line ------------------------------------------------------------------------------------


def _eif_build(cli, tmp_path: Path, blob_layout: Path):  # type: ignore[no-untyped-def]
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout

    if not (tmp_path / "app").exists():
        make_layout(str(tmp_path / "app"), "v", [[Entry.file("bin/app", b"app", 0o755)]], cmd=("/bin/app",))
    return cli("eif", "build", "--image", f"oci:{tmp_path / 'app'}:v", "--blobs", f"oci:{blob_layout}:v",
               "-o", str(tmp_path / "a.eif"), "--cache-dir", str(tmp_path / "cache"))


def _check_refused(result, tmp_path: Path, words: str) -> None:  # type: ignore[no-untyped-def]
    assert result.code == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert CANARY.decode() not in result.stdout + result.stderr
    assert not (tmp_path / "a.eif").exists() and not _leaks(tmp_path / "cache")
    assert not list((tmp_path / "cache" / "blobs").glob("*.tmp-*"))


@pytest.mark.parametrize("attack", ["kernel symlink, absolute", "init symlink, relative ..",
                                    "cmdline hard link to a symlink out", "config symlink"])
def test_eif_build_refuses_links_to_host_files(cli, tmp_path: Path, host: Path, dev: dict[str, bytes],  # type: ignore[no-untyped-def]
                                               attack: str) -> None:
    raw_layout(tmp_path / "blob-image", _layers(ATTACKS[attack][0](dev), host))
    _check_refused(_eif_build(cli, tmp_path, tmp_path / "blob-image"), tmp_path, "link")


@pytest.mark.parametrize("attack", ["blobs dir symlink, absolute", "a later layer puts a symlink over the set's dir"])
def test_eif_build_refuses_a_symlinked_blob_directory(cli, tmp_path: Path, host: Path, dev: dict[str, bytes],  # type: ignore[no-untyped-def]
                                                      attack: str) -> None:
    raw_layout(tmp_path / "blob-image", _layers(ATTACKS[attack][0](dev), host))
    _check_refused(_eif_build(cli, tmp_path, tmp_path / "blob-image"), tmp_path, "link")


@pytest.mark.parametrize("name", ["deep", "long", "nul"])
def test_eif_build_says_exit_2_for_malformed_blob_images(cli, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    import tarfile

    path = {"deep": "/".join(["d"] * 1200) + "/f", "long": "x" * 300, "nul": "a\0b"}[name]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("placeholder")
        info.pax_headers = {"path": path}
        tar.addfile(info, io.BytesIO(b""))
    raw_layout(tmp_path / name, [raw.getvalue()])
    result = _eif_build(cli, tmp_path, tmp_path / name)
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    assert not list((tmp_path / "cache" / "blobs").glob("*.tmp-*"))  # the failed flatten cleaned up


# -- property: whatever the layers, a blob set is the image's own regular files ---------------------------

PLACES = ["", "blobs", "usr/share/nitro_enclaves/blobs", "blobs/x86_64", "usr", "usr/share/nitro_enclaves"]
FILES = ["bzImage", "cmdline", "init", "nsm.ko", "bzImage.config", ".wh.bzImage", ".wh..wh..opq", ".wh.blobs"]


@given(st.lists(st.lists(st.tuples(st.sampled_from(PLACES), st.sampled_from(FILES + [""]),
                                   st.sampled_from(["file", "dir", "symlink", "hardlink"]),
                                   st.sampled_from(["HOST/etc/shadow", "HOST/blobs", "../../../HOST/etc/shadow",
                                                    "blobs", "bzImage", "/", "blobs/bzImage"])),
                         max_size=14), min_size=1, max_size=3))
def test_property_blob_sets_hold_only_the_images_files(layers: list[list[tuple[str, str, str, str]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "host" / "etc").mkdir(parents=True)
        (base / "host" / "etc" / "shadow").write_bytes(CANARY)
        (base / "host" / "blobs").mkdir()
        for name in ("bzImage", "cmdline", "init"):
            (base / "host" / "blobs" / name).write_bytes(CANARY)
        payloads: set[bytes] = set()
        members: list[list[Member]] = []
        for i, layer in enumerate(layers):
            members.append([])
            for j, (place, name, kind, target) in enumerate(layer):
                path = "/".join(p for p in (place, name) if p) or "x"
                data = f"layer{i}-entry{j}".encode()
                if kind == "file":
                    payloads.add(data)
                members[-1].append((path, kind, data if kind == "file" else target))
        store, image = stored(base / "store", _layers(members, base / "host"))
        try:
            blobs = blobs_module.load_image_blobs(store, image, "x86_64")
        except EnclaverError:
            pass
        else:
            for path in blobs.root.iterdir():
                assert not path.is_symlink() and path.is_file()
                if path.name != ".enclaver-source.json":
                    assert path.read_bytes() in payloads  # every byte is one of the image's own files
        assert not _leaks(base / "store")
        assert not list((base / "store" / "blobs").glob("*.tmp-*")) if (base / "store" / "blobs").exists() else True

"""Flattening layers into a root file system: whiteouts, links, and layers that try to escape."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci.flatten import UnsafeLayer, flatten
from oci_helpers import tar_bytes


def apply(root: Path, *layers: bytes) -> object:
    return flatten([(f"layer{i}", io.BytesIO(data)) for i, data in enumerate(layers)], root)


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): the outside directory must stay empty whatever a layer does."""
    (tmp_path / "outside").mkdir()
    return tmp_path / "root", tmp_path / "outside"


def test_files_dirs_links(box: tuple[Path, Path]) -> None:
    root, _ = box
    result = apply(root, tar_bytes([("etc", "dir", ""), ("etc/os-release", "file", "debian"),
                                    ("bin/busybox", "file", "BB"), ("bin/sh", "symlink", "busybox"),
                                    ("bin/ls", "hardlink", "bin/busybox"), ("/abs/file", "file", "a"),
                                    ("./dot/file", "file", "d")], compress=False))
    assert (root / "etc/os-release").read_text() == "debian"
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.stat(root / "bin/ls").st_ino == os.stat(root / "bin/busybox").st_ino
    assert (root / "abs/file").read_text() == "a" and (root / "dot/file").read_text() == "d"
    assert result.entries == 7  # type: ignore[attr-defined]


def test_whiteouts_and_opaque_dirs(box: tuple[Path, Path]) -> None:
    root, _ = box
    lower = tar_bytes([("a/keep", "file", "1"), ("a/drop", "file", "2"), ("o/old", "file", "3"), ("gone", "file", "4")])
    upper = tar_bytes([("a/.wh.drop", "file", ""), ("o/.wh..wh..opq", "file", ""), ("o/new", "file", "5"),
                       (".wh.gone", "file", "")])
    apply(root, lower, upper)
    assert sorted(os.listdir(root / "a")) == ["keep"]
    assert sorted(os.listdir(root / "o")) == ["new"]
    assert not (root / "gone").exists() and not list(root.rglob(".wh.*"))


def test_later_layer_replaces_kinds(box: tuple[Path, Path]) -> None:
    root, _ = box
    apply(root, tar_bytes([("x", "dir", ""), ("x/y", "file", "1"), ("f", "file", "2")]),
          tar_bytes([("x", "file", "now a file"), ("f", "dir", "")]))
    assert (root / "x").read_text() == "now a file" and (root / "f").is_dir()


def test_devices_are_recorded_not_created(box: tuple[Path, Path]) -> None:
    root, _ = box
    result = apply(root, tar_bytes([("dev/null", "chardev", ""), ("run/fifo", "fifo", "")]))
    assert not (root / "dev/null").exists() and not (root / "run/fifo").exists()
    special = result.special  # type: ignore[attr-defined]
    assert special["dev/null"].kind == "chardev" and (special["dev/null"].major, special["dev/null"].minor) == (1, 3)
    assert special["run/fifo"].kind == "fifo"


def test_traversal_is_refused(box: tuple[Path, Path]) -> None:
    root, outside = box
    with pytest.raises(UnsafeLayer, match="climbs out of the image"):
        apply(root, tar_bytes([("../outside/pwned", "file", "x")]))
    with pytest.raises(UnsafeLayer):
        apply(root, tar_bytes([("a/../../outside/pwned", "file", "x")]))
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("link", ["OUTSIDE", "../outside", "../../../../../../OUTSIDE", "/"])
def test_symlink_escape_stays_inside(box: tuple[Path, Path], link: str) -> None:
    root, outside = box
    target = link.replace("OUTSIDE", str(outside))
    apply(root, tar_bytes([("evil", "symlink", target), ("evil/pwned", "file", "x")]))
    assert list(outside.iterdir()) == []
    assert len([p for p in root.rglob("pwned")]) == 1  # it landed inside the root


def test_symlink_planted_by_an_earlier_layer(box: tuple[Path, Path]) -> None:
    root, outside = box
    apply(root, tar_bytes([("etc", "symlink", str(outside))]), tar_bytes([("etc/passwd", "file", "root::0:0")]))
    assert list(outside.iterdir()) == []
    assert (root / outside.relative_to("/") / "passwd").read_text() == "root::0:0"


@pytest.mark.parametrize("linkname", ["/etc/passwd", "../outside/secret", "via/passwd"])
def test_hardlink_escape_is_refused(box: tuple[Path, Path], linkname: str) -> None:
    root, outside = box
    (outside / "secret").write_text("host secret")
    members = [("via", "symlink", "/etc"), ("x", "hardlink", linkname)]
    with pytest.raises(UnsafeLayer):
        apply(root, tar_bytes(members))
    assert (outside / "secret").stat().st_nlink == 1


def test_whiteout_cannot_delete_outside(box: tuple[Path, Path]) -> None:
    root, outside = box
    (outside / "precious").write_text("x")
    apply(root, tar_bytes([("l", "symlink", str(outside)), ("l/.wh.precious", "file", "")]))
    assert (outside / "precious").exists()


def test_corrupt_and_truncated_layers(box: tuple[Path, Path]) -> None:
    root, _ = box
    good = tar_bytes([("f", "file", "x" * 100000)])
    with pytest.raises(OperationFailed, match="broken layer"):
        apply(root, good[: len(good) // 2])
    with pytest.raises(OperationFailed, match="zstd"):
        apply(root, b"\x28\xb5\x2f\xfd" + b"\0" * 100)


def test_devices_follow_what_later_entries_do_to_their_place(box: tuple[Path, Path]) -> None:
    root, _ = box
    result = apply(root, tar_bytes([("dev/null", "chardev", ""), ("dev/zero", "chardev", ""), ("run/fifo", "fifo", ""),
                                    ("old/fifo", "fifo", "")]),
                   tar_bytes([("dev/null", "file", "now a file"), ("dev", "dir", ""), ("run/.wh..wh..opq", "file", ""),
                              (".wh.old", "file", "")]))
    assert sorted(result.special) == ["dev/zero"]  # type: ignore[attr-defined]
    assert (root / "dev/null").read_text() == "now a file"

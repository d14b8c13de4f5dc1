"""Flattening hostile layers: nothing outside the root is touched (not a byte, mode, time or link
count), set-id bits are dropped unless root asks to keep them, and every malformed entry (too deep,
too long, NUL, empty link, huge headers, a file used as a directory) is a clear error, never a
traceback. `host` stands for the builder's file system: a snapshot of it must not change."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaver_rules.errors import EnclaverError, InvalidInput, OperationFailed
from enclaver_rules.oci.flatten import UnsafeLayer, flatten
from oci_helpers import tar_bytes

MAX_DEPTH = 256  # the documented limit: an entry lies at most this many directories deep
HOST_TIME = 1_000_000  # the host's files and directories carry this mtime; layers use others


def apply(root: Path, *layers: bytes, **options: object) -> object:
    return flatten([(f"layer{i}", io.BytesIO(data)) for i, data in enumerate(layers)], root, **options)  # type: ignore[arg-type]


def make_host(base: Path) -> Path:
    """A stand-in for the builder's files: /etc/passwd and /etc/shadow, a directory /etc/sub."""
    host = base / "host"
    (host / "etc" / "sub").mkdir(parents=True)
    (host / "etc" / "passwd").write_text("root:x:0:0:HOST\n")
    (host / "etc" / "shadow").write_text("root:HOST-SECRET:19000::::::\n")
    for path in (host / "etc" / "sub", host / "etc" / "passwd", host / "etc" / "shadow", host / "etc", host):
        os.chmod(path, 0o750 if path.is_dir() else 0o640)
        os.utime(path, (HOST_TIME, HOST_TIME))
    return host


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree without following links: kind, mode, times, links, bytes."""
    seen: dict[str, tuple[object, ...]] = {}
    for here, dirs, files in os.walk(top):
        for name in [".", *dirs, *files]:
            path = Path(here) / name
            st_ = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st_.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                content = os.readlink(path)
            seen[str(path.relative_to(top))] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_mtime_ns,
                                                st_.st_nlink, st_.st_uid, st_.st_gid, content)
    return seen


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(root, host)."""
    return tmp_path / "root", make_host(tmp_path)


# -- nothing is changed through a link ------------------------------------------------------------


def _target(kind: str, host: Path) -> str:
    # root is tmp/root, so `../host/etc` from root/a is the host's /etc
    return str(host / "etc") if kind == "absolute" else "../host/etc"


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_directory_times_and_modes_never_go_through_a_later_symlink(box: tuple[Path, Path], kind: str) -> None:
    root, host = box
    before = snapshot(host)
    a = {"mtime": 5, "mode": 0o700}
    apply(root, tar_bytes([("a", "dir", "", a), ("a/sub", "dir", "", {"mtime": 7, "mode": 0o777})]),
          tar_bytes([("a", "symlink", _target(kind, host))]))
    assert snapshot(host) == before
    assert os.readlink(root / "a") == _target(kind, host)


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_same_layer_dir_then_symlink_over_its_parent(box: tuple[Path, Path], kind: str) -> None:
    root, host = box
    before = snapshot(host)
    apply(root, tar_bytes([("x", "dir", ""), ("x/a", "dir", ""), ("x/a/sub", "dir", "", {"mtime": 9, "mode": 0o777}),
                           ("x/a", "symlink", _target(kind, host) if kind == "absolute" else "../../host/etc")]))
    assert snapshot(host) == before


def test_symlinked_parent_then_a_file_and_a_dir_under_it(box: tuple[Path, Path]) -> None:
    root, host = box
    before = snapshot(host)
    apply(root, tar_bytes([("etc", "symlink", str(host / "etc")), ("etc/passwd", "file", "root::0:0:IMAGE\n"),
                           ("etc/sub", "dir", "", {"mtime": 3, "mode": 0o777}), ("etc/sub/f", "file", "x"),
                           ("rel", "symlink", "../../../../host/etc"), ("rel/shadow", "file", "IMAGE")]))
    assert snapshot(host) == before
    inside = root / str(host / "etc").lstrip("/")  # the absolute link resolved as if root were /
    assert (inside / "passwd").read_text() == "root::0:0:IMAGE\n" and (inside / "sub" / "f").read_text() == "x"
    assert (root / "host" / "etc" / "shadow").read_text() == "IMAGE"  # `..` stops at the root


def test_symlink_replaced_by_a_directory_in_a_later_layer(box: tuple[Path, Path]) -> None:
    root, host = box
    before = snapshot(host)
    apply(root, tar_bytes([("a", "symlink", str(host / "etc"))]),
          tar_bytes([("a", "dir", "", {"mtime": 11}), ("a/passwd", "file", "mine"), ("a/sub", "dir", "")]))
    assert snapshot(host) == before
    assert (root / "a").is_dir() and not (root / "a").is_symlink() and (root / "a" / "passwd").read_text() == "mine"
    assert os.stat(root / "a").st_mtime == 11


@pytest.mark.parametrize("linkname", ["../host/etc/shadow", "/etc/shadow", "out/shadow", "up/shadow"])
def test_hard_links_never_reach_outside(box: tuple[Path, Path], linkname: str) -> None:
    root, host = box
    before = snapshot(host)
    with pytest.raises(UnsafeLayer):
        apply(root, tar_bytes([("out", "symlink", str(host / "etc")), ("up", "symlink", "../host/etc"),
                               ("x", "hardlink", linkname)]))
    assert snapshot(host) == before


def test_a_hard_link_to_a_symlink_is_another_name_for_the_symlink(box: tuple[Path, Path]) -> None:
    root, host = box
    before = snapshot(host)
    apply(root, tar_bytes([("evil", "symlink", str(host / "etc" / "shadow")), ("copy", "hardlink", "evil")]))
    assert snapshot(host) == before
    assert (root / "copy").is_symlink() and os.readlink(root / "copy") == str(host / "etc" / "shadow")


def test_whiteouts_and_opaque_dirs_never_reach_outside(box: tuple[Path, Path]) -> None:
    root, host = box
    before = snapshot(host)
    apply(root, tar_bytes([("l", "symlink", str(host / "etc")), ("r", "symlink", "../host/etc")]),
          tar_bytes([("l/.wh.passwd", "file", ""), ("r/.wh.shadow", "file", ""), ("l/.wh..wh..opq", "file", ""),
                     ("r/sub/.wh..wh..opq", "file", "")]))
    assert snapshot(host) == before


# -- set-id bits ------------------------------------------------------------------------------------

SETID_MEMBERS = [("bin", "dir", "", {"mode": 0o2755}), ("bin/su", "file", "su", {"mode": 0o4755}),
                 ("bin/wall", "file", "wall", {"mode": 0o2755}), ("bin/both", "file", "b", {"mode": 0o6711}),
                 ("bin/su2", "hardlink", "bin/su"), ("tmp", "dir", "", {"mode": 0o1777})]


def _modes(root: Path) -> dict[str, int]:
    return {p: stat.S_IMODE(os.lstat(root / p).st_mode) for p in ("bin", "bin/su", "bin/wall", "bin/both", "bin/su2",
                                                                   "tmp")}


DROPPED = {"bin": 0o755, "bin/su": 0o755, "bin/wall": 0o755, "bin/both": 0o711, "bin/su2": 0o755, "tmp": 0o1777}
KEPT = {"bin": 0o2755, "bin/su": 0o4755, "bin/wall": 0o2755, "bin/both": 0o6711, "bin/su2": 0o4755, "tmp": 0o1777}


@pytest.mark.parametrize("keep_setid", [False, True])
def test_setid_bits_are_dropped_when_not_flattening_as_root(tmp_path: Path, keep_setid: bool) -> None:
    apply(tmp_path / "r", tar_bytes(SETID_MEMBERS), preserve_owner=False, keep_setid=keep_setid)
    assert _modes(tmp_path / "r") == DROPPED  # sticky stays: it grants nothing


@pytest.mark.skipif(os.geteuid() != 0, reason="owners can only be given as root")
def test_setid_bits_are_dropped_as_root_unless_asked(tmp_path: Path) -> None:
    members = [(m[0], m[1], m[2], {**(m[3] if len(m) > 3 else {}), "uid": 4242, "gid": 4343})  # type: ignore[misc]
               for m in SETID_MEMBERS]
    apply(tmp_path / "default", tar_bytes(members))  # type: ignore[arg-type]
    assert _modes(tmp_path / "default") == DROPPED
    assert os.lstat(tmp_path / "default" / "bin" / "su").st_uid == 4242
    apply(tmp_path / "kept", tar_bytes(members), keep_setid=True)  # type: ignore[arg-type]
    assert _modes(tmp_path / "kept") == KEPT
    assert os.lstat(tmp_path / "kept" / "bin" / "su").st_uid == 4242


# -- clear errors, bounded ----------------------------------------------------------------------------


def _pax(name: str, data: bytes = b"", **headers: str) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("placeholder")
        info.pax_headers = {"path": name, **headers}
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _deep(levels: int) -> bytes:
    return tar_bytes([("/".join(["d"] * n), "dir", "") for n in range(1, levels + 1)]
                     + [("/".join(["d"] * levels) + "/f", "file", "x")])


BAD_LAYERS = {
    "1200 deep": (lambda: _deep(1200), "deep"),
    "300-byte name": (lambda: tar_bytes([("x" * 300, "file", "x")]), "300 bytes"),
    "300-byte directory": (lambda: tar_bytes([("d/" + "y" * 300 + "/f", "file", "x")]), "300 bytes"),
    "5000-byte path": (lambda: tar_bytes([("/".join(["a" * 200] * 25), "file", "x")]), "longer than 4095"),
    "deep through a symlink": (lambda: tar_bytes([("s", "symlink", "/".join(["a"] * 200)),
                                                  ("s/" + "/".join(["b"] * 100) + "/f", "file", "x")]), "deep"),
    "symlink to a 300-byte name": (lambda: tar_bytes([("s", "symlink", "z" * 300), ("s/f", "file", "x")]),
                                   "255 bytes"),
    "symlink loop": (lambda: tar_bytes([("l", "symlink", "m"), ("m", "symlink", "l/x"), ("l/f", "file", "x")]),
                     "too many levels"),
    "symlinks that expand to thousands of steps": (
        lambda: tar_bytes([(f"s{i}", "symlink", "/".join(["."] * 2000 + [f"s{i + 1}"])) for i in range(5)]
                          + [("s5", "dir", ""), ("s0/f", "file", "x")]), "path components"),
    "NUL in a name": (lambda: _pax("a\0b", b"x"), "NUL"),
    "empty symlink": (lambda: tar_bytes([("e", "symlink", "")]), "empty target"),
    "a file as a directory": (lambda: tar_bytes([("f", "file", "x"), ("f/g", "file", "y")]), "not a directory"),
    "a whiteout without a name": (lambda: tar_bytes([(".wh.", "file", "")]), "whiteout without a name"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYERS))
def test_malformed_entries_are_clear_invalid_input(tmp_path: Path, case: str) -> None:
    make, words = BAD_LAYERS[case]
    layer = make()
    started = time.monotonic()
    with pytest.raises(InvalidInput) as caught:
        apply(tmp_path / "root", layer)
    assert time.monotonic() - started < 20
    error = caught.value
    assert isinstance(error, UnsafeLayer) and isinstance(error, OperationFailed)  # still caught as before
    diagnostic = error.diagnostics[0]
    assert diagnostic.file == "layer0" and diagnostic.fix and words in diagnostic.message, diagnostic
    assert len(str(error)) < 1000  # a kilobyte-long hostile name is cut short
    assert not (tmp_path / "root").exists()  # a failed flatten removes the root it made


def test_the_depth_limit_is_exact(tmp_path: Path) -> None:
    apply(tmp_path / "ok", tar_bytes([("/".join(["d"] * (MAX_DEPTH - 1)) + "/f", "file", "x")]))
    assert (tmp_path / "ok" / Path(*["d"] * (MAX_DEPTH - 1)) / "f").read_text() == "x"
    with pytest.raises(UnsafeLayer, match="deep"):
        apply(tmp_path / "deep", tar_bytes([("/".join(["d"] * MAX_DEPTH) + "/f", "file", "x")]))


def test_a_huge_extended_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    with pytest.raises(UnsafeLayer, match="extended header"):
        apply(tmp_path / "root", _pax("f", b"x", comment="c" * (2 << 20)))
    apply(tmp_path / "ok", _pax("f", b"x", comment="c" * 1000))  # ordinary pax headers still work
    assert (tmp_path / "ok" / "f").read_text() == "x"


def test_a_failed_flatten_leaves_an_existing_root_alone(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "mine").write_text("keep")
    with pytest.raises(UnsafeLayer):
        apply(tmp_path / "root", tar_bytes([("x" * 300, "file", "x")]))
    assert (tmp_path / "root" / "mine").read_text() == "keep"


# -- property: whatever the layers, the host is untouched and errors are ours ----------------------------

NAMES = ["a", "b", "a/b", "a/b/c", "l", "l/x", "l/sub", "a/l", "a/l/y", "r", "r/sub", "r/passwd", "h"]
TARGETS = ["HOST/etc", "HOST/etc/shadow", "HOST/etc/sub", "../host/etc", "../../host/etc/passwd", "/", "..", "a",
           "l", "a/b", "r/sub", "/etc", "."]


def _member() -> st.SearchStrategy[tuple[str, str, str, dict[str, int]]]:
    attrs = st.fixed_dictionaries({"mode": st.sampled_from([0o755, 0o4755, 0o2775, 0o700, 0o1777, 0o6711]),
                                   "mtime": st.integers(0, 2**31)})
    name = st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES).map(lambda n: f"{n}/.wh.sub"),
                     st.sampled_from(NAMES).map(lambda n: f"{n}/.wh..wh..opq"))
    return st.tuples(name, st.sampled_from(["file", "dir", "symlink", "hardlink"]), st.sampled_from(TARGETS), attrs)


@given(st.lists(st.lists(_member(), max_size=12), min_size=1, max_size=3))
def test_property_the_host_is_never_touched(layers: list[list[tuple[str, str, str, dict[str, int]]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        host = make_host(base)
        before = snapshot(host)
        built = [tar_bytes([(n, k, t.replace("HOST", str(host)) if k in ("symlink", "hardlink") else "data", a)
                            for n, k, t, a in layer]) for layer in layers]
        try:
            apply(base / "root", *built, preserve_owner=False)
        except EnclaverError:
            pass
        else:
            for here, dirs, files in os.walk(base / "root"):
                for name in [*dirs, *files]:
                    mode = os.lstat(Path(here) / name).st_mode
                    assert stat.S_ISLNK(mode) or not mode & 0o6000, (here, name)
        assert snapshot(host) == before

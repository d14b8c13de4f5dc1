"""Kernel blob sets: the kernel, its cmdline, the enclave init and nsm.ko that every EIF carries.

A blob set is a directory laid out like nitro-cli's (`/usr/share/nitro_enclaves/blobs`):
`bzImage` (x86_64) or `Image` (aarch64), optionally `<kernel>.config`, `cmdline`, `init`,
`nsm.ko`. Its digest (sha256 over the names and digests of those files) is recorded with every
output, since PCR1 depends on nothing else. `write_dev_blobs` makes a deterministic development
set — not bootable, marked as such — so the pipeline can be tried where no real set exists.

A blob set holds its files, never links: each file is opened relative to the set's directory with
`O_NOFOLLOW` and must be a regular file, so a symlink (`bzImage -> /etc/shadow`) is an error naming
it, never a way to embed another file of the builder in an EIF. (The directory's own path is the
user's, and may pass through symlinks.)

`load_image_blobs` takes a blob set from an image without flattening it onto the host: it reads
the image's layers as tar streams and keeps only the entries literally at the blob set's paths
(whiteouts and opaque directories applied), written by this module into a fresh directory of the
store. Any link there — the files, or a directory on their way (`/blobs -> /usr/share/...`) — is an
error naming the layer and the entry; nothing in the image is ever resolved on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.errors import InvalidInput

# The layer reader, the stamps and the store load when a blob set is read: `enclaver` builds its parser
# (KERNEL_NAMES, DEFAULT_BLOBS) on every start.
if TYPE_CHECKING:
    import tarfile

    from enclaver_rules.oci.digest import Digest
    from enclaver_rules.oci.stamps import Stamps
    from enclaver_rules.oci.store import Store
    from enclaver_rules.oci.transfer import StoredImage

KERNEL_NAMES = {"x86_64": "bzImage", "aarch64": "Image"}
DEFAULT_BLOBS = Path("/usr/share/nitro_enclaves/blobs")
MARKER = "enclaver-blobs.json"
#: nitro-cli's cmdline blobs (aws/aws-nitro-enclaves-cli blobs/<arch>/cmdline), trailing newline included.
NITRO_CMDLINES = {
    "x86_64": "reboot=k panic=30 pci=off nomodules console=ttyS0 i8042.noaux i8042.nomux i8042.nopnp "
              "i8042.dumbkbd random.trust_cpu=on\n",
    "aarch64": "reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on root=/dev/ram0\n",
}
ARCH_OF_PLATFORM = {"amd64": "x86_64", "arm64": "aarch64"}
#: Where an image may carry its blob set, in the order looked at (the first holding the kernel wins).
IMAGE_BLOB_DIRS = ("", "blobs", "usr/share/nitro_enclaves/blobs", "blobs/{arch}")
#: What a blob set file taken from an image may weigh (real kernels are 5-40 MiB): bounds the disk a hostile image fills.
MAX_BLOB_FILE = 256 << 20
#: In a store's blob set directory: the image, entries and digest it was taken from.
SOURCE_RECORD = ".enclaver-source.json"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class BlobSet:
    root: Path
    arch: str
    kernel: Path
    cmdline: Path
    init: Path
    nsm: Path | None
    kernel_config: Path | None
    development: bool
    digest: Digest

    def cmdline_bytes(self) -> bytes:
        """nitro-cli trims the cmdline file and stores it without a NUL."""
        return self.cmdline.read_text(encoding="utf-8").strip().encode("utf-8")

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.root), "arch": self.arch, "digest": str(self.digest), "development": self.development}


def image_arch(image: StoredImage) -> str:
    """The enclave architecture of an image (x86_64, aarch64), or `InvalidInput`. Here, not in
    `build`, so that `resolve` (every no-op build) does not load the EIF writer and its signer."""
    platform = image.config.platform
    arch = ARCH_OF_PLATFORM.get(platform.architecture)
    if platform.os != "linux" or arch is None:
        raise InvalidInput(f"{image.name} is a {platform} image; enclaves run linux/amd64 or linux/arm64",
                           file="IMAGE", fix="build the app image for linux/amd64 or linux/arm64")
    return arch


def _names(arch: str) -> tuple[str, ...]:
    """The files of an `arch` blob set: the kernel, its config, cmdline, init, nsm.ko, the development marker."""
    kernel = KERNEL_NAMES[arch]
    return kernel, f"{kernel}.config", "cmdline", "init", "nsm.ko", MARKER


def _other(arch: str) -> str:
    return "x86_64" if arch == "aarch64" else "aarch64"


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read_at(dir_fd: int, name: str, path: Path, *, keep: int = 0) -> tuple[str, bytes]:
    """The sha256 of the regular file `name` (opened without following a link, and without
    blocking on a FIFO), and its bytes when `keep` (their most) is given."""
    import hashlib

    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    hasher = hashlib.sha256()
    kept: list[bytes] = []
    size = 0
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidInput(f"{path} is not a regular file", file=str(path),
                               fix="a blob set holds regular files: put the file itself there")
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
            if keep:
                if size > keep:
                    raise InvalidInput(f"{path} is more than {keep:,} bytes", file=str(path),
                                       fix="this is not a blob set's file; check it")
                kept.append(chunk)
    return hasher.hexdigest(), b"".join(kept)


def load_blobs(path: str | Path, arch: str, expect: Digest | None = None) -> BlobSet:
    root = Path(path)
    if arch not in KERNEL_NAMES:
        raise InvalidInput(f"{arch!r} is not an enclave architecture", fix="use x86_64 or aarch64")
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the user's path: links in it are theirs
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidInput(f"{root}: no such blob directory", file=str(root),
                           fix=f"install aws-nitro-enclaves-cli ({DEFAULT_BLOBS}), or make a development set with "
                               f"`enclaver blobs dev -o DIR`") from None
    except OSError as e:
        raise InvalidInput(f"{root}: cannot read the blob directory: {e.strerror}", file=str(root),
                           fix="check its permissions") from None
    try:
        return _load_at(dir_fd, root, arch, expect)
    except OSError as e:
        raise InvalidInput(f"{root}: cannot read the blob set: {e.strerror or e}", file=str(root),
                           fix="check the files and their permissions") from None
    finally:
        os.close(dir_fd)


def load_blobs_stamped(path: str | Path, arch: str, stamps: Stamps | None) -> BlobSet:
    """`load_blobs`, or, when `stamps` holds its last result and not one of the set's names changed
    since (each file's stamp, taken before it was hashed, still matches; an absent one is still
    absent: see `enclaver_rules.oci.stamps`), that result without hashing the files again. A build
    that reads the files calls `load_blobs` with the recorded digest, which hashes them again."""
    from enclaver_rules.oci.digest import Digest
    from enclaver_rules.oci.stamps import stamp

    if stamps is None:
        return load_blobs(path, arch)
    root = Path(path)
    key = f"blobs:{os.path.abspath(root)}:{arch}"
    known = stamps.get(key)
    if known is not None:
        try:
            kept, kernel = set(known["present"]), KERNEL_NAMES[arch]
            return BlobSet(root, arch, root / kernel, root / "cmdline", root / "init",
                           root / "nsm.ko" if "nsm.ko" in kept else None,
                           root / f"{kernel}.config" if f"{kernel}.config" in kept else None,
                           bool(known["development"]), Digest.parse(known["digest"]))
        except (KeyError, TypeError, ValueError):
            pass
    before = [stamp(root / name, follow=False) for name in _names(arch)]  # the links themselves, as read
    blobs = load_blobs(root, arch)
    present = sorted(f.name for f in (blobs.nsm, blobs.kernel_config) if f is not None)
    stamps.put(key, before, {"digest": str(blobs.digest), "development": blobs.development, "present": present},
               follow=False)
    return blobs


#: The most of a blob set's cmdline and marker read into memory (a kernel command line is at most a few KiB).
SMALL_FILE = 64 << 10


def _load_at(dir_fd: int, root: Path, arch: str, expect: Digest | None) -> BlobSet:
    from enclaver_rules.oci.digest import Digest
    from enclaver_rules.oci.flatten import show

    kernel = KERNEL_NAMES[arch]
    present: set[str] = set()
    for name in _names(arch):
        st = _lstat(dir_fd, name)
        if st is None:
            continue
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=dir_fd)
            raise InvalidInput(f"{root / name} is a symbolic link to {show(target)}; a blob set holds the files "
                               f"themselves, never links", file=str(root / name),
                               fix=f"replace the link by a copy of the file it names, e.g. "
                                   f"cp --remove-destination \"$(readlink -f {root / name})\" {root / name}")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{root / name} is not a regular file", file=str(root / name),
                               fix="a blob set holds regular files: put the file itself there")
        present.add(name)
    missing = [n for n in (kernel, "cmdline", "init") if n not in present]
    if missing:
        other = KERNEL_NAMES[_other(arch)]
        other_st = _lstat(dir_fd, other)
        hint = (f" (it holds {other}: an {_other(arch)} blob set?)"
                if other_st is not None and not stat.S_ISDIR(other_st.st_mode) else "")
        raise InvalidInput(f"{root}: missing {', '.join(missing)} for {arch}{hint}", file=str(root),
                           fix="point --blobs at a blob set of the enclave's architecture")
    files: dict[str, str] = {}
    small: dict[str, bytes] = {}
    for name in _names(arch):
        if name in present:
            keep = SMALL_FILE if name in ("cmdline", MARKER) else 0
            files[name], small[name] = _read_at(dir_fd, name, root / name, keep=keep)
    development = False
    if MARKER in present:
        try:
            marker = json.loads(small[MARKER])
        except ValueError:
            marker = None
        if not isinstance(marker, dict):
            raise InvalidInput(f"{root / MARKER}: unreadable", file=str(root / MARKER), fix="regenerate the blob set")
        development = bool(marker.get("development"))
    try:
        small["cmdline"].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{root / 'cmdline'} is not UTF-8 text", file=str(root / "cmdline"),
                           fix="a kernel command line is text: use nitro-cli's cmdline file") from None
    digest = Digest.of(json.dumps(files, sort_keys=True, separators=(",", ":")).encode())
    if expect is not None and digest != expect:
        raise InvalidInput(f"{root}: blob set digest is {digest}, expected {expect}", file=str(root),
                           fix="the blobs changed (another nitro-cli version?); check them, or update the recorded digest")
    nsm = root / "nsm.ko" if "nsm.ko" in present else None
    config = root / f"{kernel}.config" if f"{kernel}.config" in present else None
    return BlobSet(root, arch, root / kernel, root / "cmdline", root / "init", nsm, config, development, digest)


# -- blob sets carried by images ---------------------------------------------------------------


@dataclass(slots=True)
class _Seen:
    """What the merged layers have so far at one path of interest."""

    kind: str  # dir | file | symlink | hardlink | other
    path: str  # blobs/bzImage
    where: str  # "layer 2 of 3 (sha256:…): /blobs/bzImage"
    target: str = ""
    spool: str | None = None


@dataclass(slots=True)
class _ImageReader:
    """The entries of an image at the paths where a blob set may lie, layer over layer, read from
    the layer streams alone; regular files are spooled into `spool_fd` (a fresh directory)."""

    arch: str
    spool_fd: int
    ref: str
    dirs: tuple[str, ...] = ()
    wanted_files: set[str] = field(default_factory=set)
    wanted_dirs: set[str] = field(default_factory=set)
    state: dict[str, _Seen] = field(default_factory=dict)
    spools: int = 0

    def __post_init__(self) -> None:
        self.dirs = tuple(d.format(arch=self.arch) for d in IMAGE_BLOB_DIRS)
        names = (*_names(self.arch), KERNEL_NAMES[_other(self.arch)])
        self.wanted_files = {_join(d, n) for d in self.dirs for n in names}
        self.wanted_dirs = {p for d in self.dirs for p in _prefixes(d)}

    def _drop(self, path: str) -> None:
        seen = self.state.pop(path, None)
        if seen is not None and seen.spool is not None:
            os.unlink(seen.spool, dir_fd=self.spool_fd)

    def _drop_below(self, path: str) -> None:
        for key in [k for k in self.state if not path or k.startswith(path + "/")]:
            self._drop(key)

    def layer(self, label: str, stream: Any) -> None:
        from enclaver_rules.oci.flatten import read_layer

        added: set[str] = set()

        def visit(tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
            self.member(label, tar, m, added)

        read_layer(label, stream, visit)

    def member(self, label: str, tar: tarfile.TarFile, m: tarfile.TarInfo, added: set[str]) -> None:
        from enclaver_rules.oci.flatten import OPAQUE, WHITEOUT, UnsafeLayer, member_parts, show

        parts = member_parts(m.name, label)
        if not parts:
            return
        for depth in range(1, len(parts)):  # below a symlink or a file: it does not land at its name
            above = self.state.get("/".join(parts[:depth]))
            if above is not None and above.kind != "dir":
                return
        path, name, parent = "/".join(parts), parts[-1], "/".join(parts[:-1])
        if name == OPAQUE:
            for key in [k for k in self.state if (not parent or k.startswith(parent + "/")) and k not in added]:
                self._drop(key)
            return
        if name.startswith(WHITEOUT):
            hidden = name[len(WHITEOUT):]
            if hidden in ("", ".", ".."):
                raise UnsafeLayer(f"entry {show(m.name)}: a whiteout without a name", file=label,
                                  fix="the layer is malicious or broken; do not use the image")
            gone = _join(parent, hidden)
            self._drop(gone)
            self._drop_below(gone)
            return
        if path not in self.wanted_files and path not in self.wanted_dirs:
            return
        kind = ("dir" if m.isdir() else "file" if m.isreg() else "symlink" if m.issym() else
                "hardlink" if m.islnk() else "other")
        seen = _Seen(kind, path, f"{label}: /{path}", m.linkname if kind in ("symlink", "hardlink") else "")
        added.add(path)
        before = self.state.get(path)
        if kind == "dir" and (before is None or before.kind == "dir"):
            self.state[path] = seen  # a directory over a directory (or an implicit one): what is below stays
            return
        self._drop(path)  # anything else replaces what was there, and all that was below it
        self._drop_below(path)
        if kind == "file" and path in self.wanted_files:
            if m.size > MAX_BLOB_FILE:
                raise InvalidInput(f"{seen.where} is {m.size:,} bytes, more than a blob set file may be "
                                   f"({MAX_BLOB_FILE:,})", file=self.ref,
                                   fix="this is not a kernel blob set; check the image")
            seen.spool = f".spool-{self.spools}"
            self.spools += 1
            fd = os.open(seen.spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.spool_fd)
            with os.fdopen(fd, "wb") as out:
                source = tar.extractfile(m)
                assert source is not None
                shutil.copyfileobj(source, out, 1 << 20)
        self.state[path] = seen

    def _link_error(self, seen: _Seen, what: str) -> InvalidInput:
        from enclaver_rules.oci.flatten import show

        kind = "a symbolic" if seen.kind == "symlink" else "a hard"
        return InvalidInput(f"{seen.where} is {kind} link to {show(seen.target)}; a blob set is read from the "
                            f"image's own files and directories, never through a link", file=self.ref,
                            fix=f"put the {what} itself at /{seen.path} in the blob image (copy it, e.g. with "
                                f"`cp -L`, before building the image)")

    def choose(self) -> tuple[str, dict[str, str]]:
        """Move the chosen set's files from the spool to their names; return its directory and entries."""
        kernel = KERNEL_NAMES[self.arch]
        chosen = None
        for d in self.dirs:
            blocked = False
            for above in _prefixes(d):
                seen = self.state.get(above)
                if seen is None or seen.kind == "dir":
                    continue
                if seen.kind in ("symlink", "hardlink"):
                    raise self._link_error(seen, "directory")
                blocked = True  # a file: no blob set below it
                break
            if not blocked and _join(d, kernel) in self.state:
                chosen = d
                break
        if chosen is None:
            other = KERNEL_NAMES[_other(self.arch)]
            hint = (f" (it holds {other}: an {_other(self.arch)} blob set?)"
                    if any(_join(d, other) in self.state for d in self.dirs) else "")
            raise InvalidInput(f"{self.ref}: the image carries no {self.arch} blob set{hint}", file=self.ref,
                               fix=f"put {kernel}, cmdline, init and nsm.ko at its root or under /blobs")
        entries: dict[str, str] = {}
        for name in _names(self.arch):
            seen = self.state.get(_join(chosen, name))
            if seen is None:
                continue
            if seen.kind in ("symlink", "hardlink"):
                raise self._link_error(seen, "file")
            if seen.kind != "file" or seen.spool is None:
                raise InvalidInput(f"{seen.where} is not a regular file ({seen.kind})", file=self.ref,
                                   fix=f"put the file {name} itself there in the blob image")
            os.rename(seen.spool, name, src_dir_fd=self.spool_fd, dst_dir_fd=self.spool_fd)
            seen.spool = None
            entries[name] = seen.where
        missing = [n for n in (kernel, "cmdline", "init") if n not in entries]
        if missing:
            raise InvalidInput(f"{self.ref}: the blob set at /{chosen} lacks {', '.join(missing)}", file=self.ref,
                               fix=f"put {kernel}, cmdline, init and nsm.ko together in one directory of the image")
        for key in list(self.state):
            self._drop(key)
        return chosen, entries


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _prefixes(path: str) -> list[str]:
    """`usr/share/x` -> [`usr`, `usr/share`, `usr/share/x`]."""
    parts = path.split("/") if path else []
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _remove_tree(path: Path) -> None:
    """Remove a store directory of ours, never following a link (a link is removed itself)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def image_blob_dir(store: Store, image_digest: Digest, arch: str) -> Path:
    """Where the store keeps the `arch` blob set of an image; it is staged in `<that>.tmp-<pid>`."""
    return store.root / "blobs" / f"{image_digest.hex}-{arch}"


def _intact(final: Path, image: StoredImage, arch: str) -> BlobSet | None:
    try:
        dir_fd = os.open(final, _DIR_FLAGS)
    except OSError:
        return None
    try:
        _, raw = _read_at(dir_fd, SOURCE_RECORD, final / SOURCE_RECORD, keep=SMALL_FILE)
        record = json.loads(raw)
        extra = set(os.listdir(dir_fd)) - {*_names(arch), SOURCE_RECORD}
    except (InvalidInput, OSError, ValueError):
        return None
    finally:
        os.close(dir_fd)
    if not isinstance(record, dict) or extra or record.get("image") != str(image.digest) or record.get("arch") != arch:
        return None
    try:
        blobs = load_blobs(final, arch)
    except InvalidInput:
        return None
    return blobs if str(blobs.digest) == record.get("digest") else None


def _cached(final: Path, image: StoredImage, arch: str) -> BlobSet | None:
    """The blob set a previous run took from this image, if it is intact (else it is removed)."""
    if not os.path.lexists(final):
        return None
    blobs = _intact(final, image, arch)
    if blobs is None:
        _remove_tree(final)  # another format, damaged or tampered with: taken again from the image
    return blobs


def load_image_blobs(store: Store, image: StoredImage, arch: str, expect: Digest | None = None, *,
                     ref: str = "") -> BlobSet:
    """The `arch` blob set `image` carries (at its root, /blobs, /usr/share/nitro_enclaves/blobs or
    /blobs/ARCH: the first holding the kernel), read from its layers alone into the store.

    A link at any of its files or directories, an entry that is not a regular file, or a file over
    MAX_BLOB_FILE is an InvalidInput naming the layer and the entry. A failure leaves no staging."""
    from enclaver_rules.oci.store import atomic_write

    if arch not in KERNEL_NAMES:
        raise InvalidInput(f"{arch!r} is not an enclave architecture", fix="use x86_64 or aarch64")
    ref = ref or image.name
    final = image_blob_dir(store, image.digest, arch)
    blobs = _cached(final, image, arch)
    if blobs is None:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        try:
            _remove_tree(staging)  # left by a dead process that had our pid
            staging.mkdir(0o700)
            spool_fd = os.open(staging, _DIR_FLAGS)
            try:
                reader = _ImageReader(arch, spool_fd, ref)
                layers = image.manifest.layers
                for i, descriptor in enumerate(layers, 1):
                    with store.open(descriptor.digest) as stream:
                        reader.layer(f"layer {i} of {len(layers)} ({descriptor.digest.short})", stream)
                chosen, entries = reader.choose()
            finally:
                os.close(spool_fd)
            taken = load_blobs(staging, arch)
            atomic_write(staging / SOURCE_RECORD, json.dumps(
                {"image": str(image.digest), "ref": ref, "arch": arch, "directory": f"/{chosen}", "entries": entries,
                 "digest": str(taken.digest)}, indent=2, sort_keys=True).encode() + b"\n")
            os.chmod(staging, 0o755)
            try:
                os.replace(staging, final)
            except OSError:  # another process took it meanwhile: keep theirs if it is intact
                if _cached(final, image, arch) is None:
                    os.replace(staging, final)
        finally:
            _remove_tree(staging)
        blobs = load_blobs(final, arch)
    if expect is not None and blobs.digest != expect:
        raise InvalidInput(f"{ref}: blob set digest is {blobs.digest}, expected {expect}", file=ref,
                           fix="the blobs changed (another nitro-cli version?); check them, or update the recorded "
                               "digest")
    return blobs


def _filler(label: bytes, size: int) -> bytes:
    import hashlib

    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(label + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def write_dev_blobs(out: str | Path, arch: str) -> BlobSet:
    """A deterministic development blob set: same bytes on every machine, never bootable."""
    from enclaver_rules.oci.store import atomic_write

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    kernel_name = KERNEL_NAMES[arch]
    banner = f"ENCLAVER DEVELOPMENT {{}} ({arch}) - NOT BOOTABLE, NOT FOR PRODUCTION\n"
    files = {
        kernel_name: banner.format("KERNEL").encode() + _filler(f"kernel-{arch}".encode(), 256 << 10),
        f"{kernel_name}.config": f"#\n# Automatically generated file; DO NOT EDIT.\n"
                                 f"# Linux/{arch} 4.14.256-enclaver-dev Kernel Configuration\n".encode(),
        "cmdline": NITRO_CMDLINES[arch].encode(),
        "init": banner.format("INIT").encode() + _filler(f"init-{arch}".encode(), 64 << 10),
        "nsm.ko": banner.format("NSM DRIVER").encode() + _filler(f"nsm-{arch}".encode(), 16 << 10),
        MARKER: json.dumps({"development": True, "arch": arch,
                            "note": "made by `enclaver blobs dev`; EIFs built from it cannot run on Nitro"},
                           sort_keys=True, indent=2).encode() + b"\n",
    }
    for name, data in files.items():
        atomic_write(root / name, data)
    return load_blobs(root, arch)

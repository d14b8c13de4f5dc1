"""Build odyn for aarch64 on an x86_64 machine: the x86_64 build's steps, inside an arm64 Debian root
run under qemu-user.

Why this shape:
- The binary bundles the build machine's libpython, glibc and shared libraries, so an aarch64
  binary needs an aarch64 userland: `mmdebstrap --arch=arm64` makes a bookworm root with Debian's
  python3, binutils, libpython3.11, and gcc, musl-tools and scons for staticx's bootloader. qemu-user
  runs it through binfmt_misc (every process the build starts, gcc's cc1 too, is aarch64), so the
  host needs `qemu-user-static` with binfmt enabled, and root for mmdebstrap and chroot.
- staticx publishes x86_64 wheels only: its pinned sdist is built in the root with Debian's
  musl-gcc (`BOOTLOADER_CC`, as upstream builds its wheels). Every other tool is an aarch64 or pure
  wheel pinned by hash in `requirements-aarch64.txt`; pip downloads them on the host (the root
  never reaches the network) and installs them in the root with --require-hashes.
- Paths inside the root are fixed (the venv at `/opt/enclaver-odyn-venv`, sources in `/build`), so
  PyInstaller's output does not depend on where the root sits on the host.
- The root is kept and reused while the package list and the pins stay the same (making it takes
  about 3.5 minutes, a build in it about 2). Debian's mirror moves with point releases and no
  snapshot service is reachable from every build machine, so the root's package versions are
  recorded (`packages()`), compared with the ones this file's pins were measured with
  (`debian-arm64.txt`), and each difference is reported: same packages, same sources, same binary.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.odyn_image.build import BUILD_EPOCH, Binary, Say, _run, hooks_dir, stage

ARCH = "aarch64"
DEBIAN_ARCH = "arm64"
SUITE = "bookworm"
MIRRORS = ("deb http://deb.debian.org/debian bookworm main",
           "deb http://deb.debian.org/debian bookworm-updates main",
           "deb http://deb.debian.org/debian-security bookworm-security main")
PACKAGES = ("python3", "python3-venv", "binutils", "libpython3.11",  # what the x86_64 build takes from the host
            "gcc", "libc6-dev", "musl-tools", "scons")  # staticx's bootloader (musl) and libnssfix (glibc)
VENV = "/opt/enclaver-odyn-venv"  # inside the root: fixed, PyInstaller's output depends on it
BUILD = "/build"
WHEELS = f"{BUILD}/wheels"
PIN_FILES = ("requirements-aarch64.txt", "requirements-aarch64-sdist.txt")
MEASURED = "debian-arm64.txt"  # the root's packages when the pins were last measured
PYTHON = "/usr/bin/python3"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _tool(name: str) -> str:
    return shutil.which(name, path=SYSTEM_PATH) or name


def _resource(name: str) -> Path:
    return Path(str(resources.files("enclaver_rules.odyn_image").joinpath(name)))


def requirement_files() -> list[Path]:
    """The wheels (installed first: setuptools and wheel build staticx) and staticx's sdist."""
    return [_resource(name) for name in PIN_FILES]


def measured_packages() -> Path:
    return _resource(MEASURED)


def check_host() -> None:
    """Fail before any download when this machine cannot make or run an arm64 root."""
    fix = "apt-get install qemu-user-static binfmt-support mmdebstrap arch-test; update-binfmts --enable qemu-aarch64"
    if platform.machine() == ARCH:
        raise InvalidInput("this machine is aarch64: build odyn natively (`doit odyn_image`), not under qemu")
    if os.geteuid() != 0:
        raise InvalidInput("the aarch64 odyn build needs root (mmdebstrap and chroot)", fix="run it as root")
    for tool in ("mmdebstrap", "chroot", "unshare"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            raise InvalidInput(f"{tool} not found: the aarch64 odyn build runs in an arm64 root", fix=fix)
    binfmt = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    try:
        enabled = binfmt.read_text().startswith("enabled")
    except OSError:
        enabled = False
    if not enabled:
        raise InvalidInput("qemu-aarch64 is not registered with binfmt_misc: the arm64 root's programs would not run",
                           fix=f"{fix} (in a container: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc "
                               "first)")


def _key() -> str:
    data = "\n".join((SUITE, DEBIAN_ARCH, *MIRRORS, *PACKAGES, VENV)).encode()
    return hashlib.sha256(data + b"".join(f.read_bytes() for f in requirement_files())).hexdigest()[:16]


def environment() -> dict[str, str]:
    """Inside the root: nothing of the caller's (as build.build_environment), the venv first on PATH."""
    return {"PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "SOURCE_DATE_EPOCH": str(BUILD_EPOCH), "PYTHONHASHSEED": "0", "TMPDIR": "/tmp",
            "PIP_NO_INDEX": "1", "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _in_root(root: Path, cmd: list[str], what: str, extra: dict[str, str] | None = None) -> None:
    # /proc for the tools that read it; a private mount namespace so nothing stays mounted
    script = f'mount -t proc proc "$1/proc" && shift && exec {_tool("chroot")} "$@"'
    _run([_tool("unshare"), "--mount", "--propagation", "private", "--fork", "sh", "-c", script, "sh", str(root), str(root),
          *cmd], {**environment(), **(extra or {})}, what)


def packages(root: Path) -> str:
    """The root's packages, `name=version` a line, sorted."""
    result = subprocess.run([_tool("chroot"), str(root), "dpkg-query", "-W", "-f", "${Package}=${Version}\\n"],
                            capture_output=True, text=True, check=False, env=environment())
    if result.returncode != 0:
        raise OperationFailed(f"cannot list the packages of {root}: {result.stderr.strip()[-300:]}")
    return "".join(sorted(line + "\n" for line in result.stdout.splitlines() if line))


def package_drift(root_packages: str) -> list[str]:
    """Packages whose version differs from the measured list: each can change the binary's bytes."""
    def parse(text: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    have, want = parse(root_packages), parse(measured_packages().read_text())
    return [f"{name} {want.get(name, 'absent')} → {have.get(name, 'absent')}"
            for name in sorted(set(have) | set(want)) if have.get(name) != want.get(name)]


def _download(dest: Path) -> None:
    """The pinned files, fetched by the host's pip (its index and proxy settings) and hash-checked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    wheels, sdist = requirement_files()
    common = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes", "-d", str(dest)]
    _run([*common, "--only-binary", ":all:", "--implementation", "cp", "--python-version", "3.11", "--abi", "cp311",
          "--abi", "abi3", "--abi", "none", *(x for p in ("manylinux_2_34", "manylinux_2_28", "manylinux_2_17",
                                                           "manylinux2014") for x in ("--platform", f"{p}_aarch64")),
          "-r", str(wheels)], env, "downloading odyn's pinned aarch64 build tools")
    _run([*common, "--no-binary", ":all:", "-r", str(sdist)], env, "downloading staticx's pinned source")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two builds at once: one makes the root, the other waits
        yield
    finally:
        os.close(fd)


def _make_root(root: Path, say: Say) -> None:
    """An arm64 root with the pinned build venv; `.complete` holds its package list."""
    if root.exists():
        shutil.rmtree(root)
    say(f"odyn: making the arm64 {SUITE} root {root} (mmdebstrap; about 3 minutes under qemu)")
    _run([_tool("mmdebstrap"), "--quiet", f"--arch={DEBIAN_ARCH}", "--variant=essential", "--include=" + ",".join(PACKAGES),
          SUITE, str(root), *MIRRORS], {"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8"},
         "mmdebstrap (the arm64 root)")
    wheels = root / WHEELS.lstrip("/")
    wheels.mkdir(parents=True)
    _download(wheels)
    for pins in requirement_files():
        shutil.copy(pins, root / BUILD.lstrip("/") / pins.name)
    say("odyn: the aarch64 build venv (pinned by hash; staticx built from source with musl-gcc)")
    _in_root(root, [PYTHON, "-m", "venv", VENV], "creating the aarch64 build venv")
    pip = [f"{VENV}/bin/python", "-m", "pip", "install", "--quiet", "--no-index", "--find-links", WHEELS,
           "--require-hashes", "--no-deps"]
    _in_root(root, [*pip, "--only-binary", ":all:", "-r", f"{BUILD}/{PIN_FILES[0]}"],
             "installing odyn's pinned aarch64 build tools")
    _in_root(root, [*pip, "--no-build-isolation", "-r", f"{BUILD}/{PIN_FILES[1]}"],
             "building staticx for aarch64", {"BOOTLOADER_CC": "musl-gcc"})
    shutil.rmtree(wheels)
    (root / ".complete").write_text(packages(root))


def root_path(cache: Path) -> Path:
    return cache.resolve() / f"aarch64-root-{_key()}"


def build_binary(cache: Path, out: Path, say: Say = print) -> tuple[Binary, str]:
    """Build `out`, the aarch64 odyn binary; returns it and the root's package list. The root is
    made once (per package list and pins) in `cache` and reused."""
    check_host()
    out = out.resolve()
    root = root_path(cache)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.with_name(root.name + ".lock")):
        if not (root / ".complete").exists():
            _make_root(root, say)
        listed = (root / ".complete").read_text()
        for line in package_drift(listed):
            say(f"odyn: note: the arm64 root differs from {MEASURED}: {line} (the binary may differ too)")
        work = f"{BUILD}/work"  # one build at a time per root (the lock), always at the same path
        host_work = root / work.lstrip("/")
        if host_work.exists():
            shutil.rmtree(host_work)
        try:
            source = stage(host_work / "src")
            shutil.copytree(hooks_dir(), host_work / "hooks")
            shutil.copy(_resource("staticx_repro.py"), host_work / "staticx_repro.py")
            say("odyn: PyInstaller for aarch64 (under qemu, about a minute)")
            schema = f"{work}/src/enclaver_rules/schemas/enclaver.schema.json"
            _in_root(root, [f"{VENV}/bin/pyinstaller", "--onefile", "--name", "odyn", "--noconfirm", "--log-level",
                            "WARN", "--paths", f"{work}/src", "--add-data", f"{schema}:enclaver_rules/schemas",
                            "--hidden-import", "enclaver_rules.schemas", "--additional-hooks-dir", f"{work}/hooks",
                            "--distpath", f"{work}/dist", "--workpath", f"{work}/build", "--specpath", work,
                            f"{work}/src/odyn_entry.py"], "PyInstaller (aarch64)")
            say("odyn: staticx for aarch64 (bundling the loader and libc; archive normalised)")
            _in_root(root, [f"{VENV}/bin/python", f"{work}/staticx_repro.py", "--strip", f"{work}/dist/odyn",
                            f"{work}/odyn-static"], "staticx (aarch64)")
            data = (host_work / "odyn-static").read_bytes()
        finally:
            shutil.rmtree(host_work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    os.replace(partial, out)
    versions = dict(line.split("=", 1) for line in listed.splitlines())
    python = versions.get("python3.11", "?").split("-")[0]
    libc = "glibc " + versions.get("libc6", "?").split("-")[0]
    return Binary(out, len(data), hashlib.sha256(data).hexdigest(), python, libc, source), listed

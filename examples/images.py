"""doit tasks that make the examples' inputs here, with no Docker Hub and no Docker engine.

Each writes an OCI image layout, `examples/<name>/image/` (the manifest's `oci:image:latest`):

* `examples:hello`: Debian's static busybox and a page it serves with `busybox httpd` on 8080;
* `examples:no-fly-list`: a Debian root made by mmdebstrap (python3, python3-boto3,
  python3-cryptography from bookworm; reproducible for the same package versions and
  SOURCE_DATE_EPOCH) and `no-fly-list/app/no_fly_list.py`, tagged `latest` (for AWS) and `sim`
  (its S3 endpoint is the simulator's: `no-fly-list/enclaver.sim.yaml`);
* `examples:vault`: HashiCorp's static `vault` binary, which cannot be downloaded here: give its
  path in VAULT_BINARY (from releases.hashicorp.com); busybox for a shell; `vault/app/config.hcl`.

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
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit.tools import config_changed

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
VAULT_CONFIG = HERE / "vault" / "app" / "config.hcl"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _rootfs_layer(store: Any, tar: Path) -> Any:
    """A root file system tarball as an uncompressed layer, streamed (hundreds of MB)."""
    from enclaver_rules.oci import mediatypes as mt
    from enclaver_rules.oci.layer import Layer

    size = tar.stat().st_size
    with open(tar, "rb") as f:
        digest = store.put_stream(f, size=size, source=str(tar))  # hashed as it is stored: one pass
    return Layer(digest, digest, size, mt.OCI_LAYER)


@reported
def no_fly_list_image(layout: str) -> None:
    from enclaver_rules.errors import InvalidInput, OperationFailed
    from enclaver_rules.oci.layer import Entry, source_date_epoch, write_layer
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
    from enclaver_rules.oci.store import Store

    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise InvalidInput("mmdebstrap is missing: the no-fly-list example's root comes from Debian's packages",
                           fix="apt-get install mmdebstrap")
    epoch = source_date_epoch()
    target = Path(layout)
    shutil.rmtree(target, ignore_errors=True)
    store = Store(target).init()
    with tempfile.TemporaryDirectory(prefix="no-fly-list-", dir=target.parent) as work:
        root = Path(work) / "root.tar"
        print(f"mmdebstrap: bookworm with {', '.join(NO_FLY_LIST_PACKAGES)} (about a minute) ...", flush=True)
        result = subprocess.run([mmdebstrap, "--quiet", "--variant=essential", "--include=" + ",".join(NO_FLY_LIST_PACKAGES),
                                 "bookworm", str(root)], env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise OperationFailed(f"mmdebstrap failed ({result.returncode}): {result.stderr.strip()[-600:]}",
                                  fix="it needs root and Debian's mirror; run `doit examples:no-fly-list` as root")
        base = _rootfs_layer(store, root)
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


@reported
def vault_image(layout: str) -> None:
    from enclaver_rules.errors import InvalidInput
    from enclaver_rules.oci.layer import Entry, source_date_epoch, write_layer
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
    from enclaver_rules.oci.store import Store

    binary = Path(os.environ.get("VAULT_BINARY", ""))
    if not os.environ.get("VAULT_BINARY") or not binary.is_file():
        raise InvalidInput("the vault example needs HashiCorp's static vault binary, which cannot be downloaded "
                           "from here (it is not in Debian, and HashiCorp's releases are off this network)",
                           file="VAULT_BINARY", fix="download vault_<version>_linux_amd64.zip from "
                           "https://releases.hashicorp.com/vault/, unzip it and set VAULT_BINARY=/path/to/vault")
    epoch = source_date_epoch()
    target = Path(layout)
    shutil.rmtree(target, ignore_errors=True)
    store = Store(target).init()
    entries = [Entry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755), Entry.symlink("bin/sh", "busybox"),
               Entry.from_file("bin/vault", binary, 0o755), Entry.file("etc/vault/config.hcl",
                                                                       VAULT_CONFIG.read_bytes(), 0o644),
               Entry.dir("tmp", 0o1777), Entry.dir("vault", 0o700)]
    layer_file = target / ".layer.tar.gz"
    with open(layer_file, "wb") as f:
        layer = write_layer(entries, f, mtime=epoch)
    with open(layer_file, "rb") as f:
        store.put_stream(f, layer.digest, layer.size)
    layer_file.unlink()
    empty, config = empty_image("x86_64")
    edited = edit_image(empty, config, layers=[layer], created=epoch, created_by="examples/images.py",
                        edit=ConfigEdit(cmd=("/bin/vault", "server", "-config=/etc/vault/config.hcl"),
                                        env=(("PATH", "/bin"), ("HOME", "/vault"))))
    store.keep_image("latest", edited)


@reported
def dev_blobs(out: str) -> None:
    from enclaver_rules.eif.blobs import write_dev_blobs

    write_dev_blobs(out, "x86_64")


def _vault_binary_stamp() -> str:
    """Which vault binary the image holds (path, size, mtime): a new one re-makes the image."""
    path = os.environ.get("VAULT_BINARY", "")
    try:
        st = os.stat(path)
    except OSError:
        return path
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def task_examples() -> Iterator[dict[str, Any]]:
    """make the examples' app images and development blob set here (no Docker Hub, no engine)"""
    yield {"name": "hello", "doc": "the hello app: static busybox httpd, as an OCI layout",
           "actions": [(hello_image, [str(HERE / "hello" / "image")])],
           "file_dep": [str(BUSYBOX), __file__], "targets": [str(HERE / "hello" / "image" / "index.json")]}
    yield {"name": "no-fly-list", "doc": "the no-fly-list app: Debian python3 + boto3 (mmdebstrap) and its code",
           "actions": [(no_fly_list_image, [str(HERE / "no-fly-list" / "image")])],
           "file_dep": [str(NO_FLY_LIST_APP), __file__],
           "targets": [str(HERE / "no-fly-list" / "image" / "index.json")], "verbosity": 2}
    yield {"name": "vault", "doc": "the vault app: HashiCorp's static binary (VAULT_BINARY) and its config",
           "actions": [(vault_image, [str(HERE / "vault" / "image")])],
           "file_dep": [str(VAULT_CONFIG), __file__],
           "targets": [str(HERE / "vault" / "image" / "index.json")],
           "uptodate": [config_changed(_vault_binary_stamp())]}
    yield {"name": "blobs", "doc": "the development kernel blob set (cannot boot; marks every EIF development)",
           "actions": [(dev_blobs, [str(HERE / "blobs-dev")])],
           "file_dep": [__file__], "targets": [str(HERE / "blobs-dev" / "enclaver-blobs.json")]}

"""doit tasks that make the examples' inputs here, with no Docker Hub and no Docker engine.

`examples:hello` writes an OCI image layout, `examples/hello/image/`, holding Debian's static
busybox and a page it serves with `busybox httpd` on 8080. `examples:blobs` writes the
deterministic *development* kernel blob set to `examples/blobs-dev/` (the examples' `build.blobs`),
because no real Nitro blob set is available off AWS: EIFs built from it are marked development and
cannot boot. Both outputs are git-ignored. Imported by dodo.py; not part of the package.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUSYBOX = Path("/bin/busybox")
PAGE = b"<!doctype html><title>hello</title><p>Hello from an enclave.</p>\n"


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


def dev_blobs(out: str) -> None:
    from enclaver_rules.eif.blobs import write_dev_blobs

    write_dev_blobs(out, "x86_64")


def task_examples() -> Iterator[dict[str, Any]]:
    """make the examples' app images and development blob set here (no Docker Hub, no engine)"""
    yield {"name": "hello", "doc": "the hello app: static busybox httpd, as an OCI layout",
           "actions": [(hello_image, [str(HERE / "hello" / "image")])],
           "file_dep": [str(BUSYBOX), __file__], "targets": [str(HERE / "hello" / "image" / "index.json")]}
    yield {"name": "blobs", "doc": "the development kernel blob set (cannot boot; marks every EIF development)",
           "actions": [(dev_blobs, [str(HERE / "blobs-dev")])],
           "file_dep": [__file__], "targets": [str(HERE / "blobs-dev" / "enclaver-blobs.json")]}

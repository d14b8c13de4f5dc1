"""Small builders for test layers and images (independent of the code under test where it matters)."""

from __future__ import annotations

import gzip
import io
import tarfile


def tar_bytes(members: list[tuple[str, str, bytes | str]] | list[tuple[str, str, bytes | str, dict[str, int]]],
              *, compress: bool = True) -> bytes:
    """members: (name, kind, data-or-linkname[, {mode, uid, gid, mtime}]); kind in file, dir, symlink,
    hardlink, chardev, fifo. Without attributes: directories 0755, the rest 0644, root, mtime 0."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, *rest in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o644
            for attr, value in (rest[0] if rest else {}).items():
                setattr(info, attr, value)
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "chardev": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = str(payload)
            if kind == "chardev":
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info)
    data = raw.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def make_layout(path: str, tag: str, layer_entries: list[list[object]], *, arch: str = "amd64",
                cmd: tuple[str, ...] = ("/bin/sh",)) -> str:
    """An image written with our layer writer into an OCI layout; returns the manifest digest."""
    from enclaver_rules.oci import mediatypes as mt
    from enclaver_rules.oci.layer import write_layer
    from enclaver_rules.oci.mutate import canonical_json
    from enclaver_rules.oci.store import Store

    store = Store(path).init()
    layers = []
    for entries in layer_entries:
        buf = io.BytesIO()
        layer = write_layer(entries, buf)  # type: ignore[arg-type]
        store.put_bytes(buf.getvalue(), layer.digest)
        layers.append(layer)
    config = canonical_json({"architecture": arch, "os": "linux", "config": {"Cmd": list(cmd)},
                             "rootfs": {"type": "layers", "diff_ids": [str(x.diff_id) for x in layers]}})
    config_digest = store.put_bytes(config)
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                               "config": {"mediaType": mt.OCI_CONFIG, "digest": str(config_digest), "size": len(config)},
                               "layers": [{"mediaType": x.media_type, "digest": str(x.digest), "size": x.size}
                                          for x in layers]})
    digest = store.put_bytes(manifest)
    from enclaver_rules.oci.model import Descriptor

    store.tag(tag, Descriptor(mt.OCI_MANIFEST, digest, len(manifest)))
    return str(digest)


def import_standin(client: object, name: str, script: bytes, files: dict[str, bytes] | None = None) -> str:
    """Import a nitro-cli stand-in into a Docker engine as `name` (repo:tag): Debian's static busybox,
    `script` as /bin/nitro-cli (the entrypoint, WORKDIR /build, as in the real image) and `files`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "build", "tmp", "var", "var/run", "standin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "cat", "cp", "printf", "echo", "pwd"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for path, data in {"bin/nitro-cli": script, **(files or {})}.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    repo, tag = name.rsplit(":", 1)
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag, changes=[  # type: ignore[attr-defined]
        'ENTRYPOINT ["/bin/nitro-cli"]', "WORKDIR /build", "ENV PATH=/bin"])
    return name

"""Small builders for test layers and images (independent of the code under test where it matters)."""

from __future__ import annotations

import gzip
import io
import tarfile


def tar_bytes(members: list[tuple[str, str, bytes | str]], *, compress: bool = True) -> bytes:
    """members: (name, kind, data-or-linkname); kind in file, dir, symlink, hardlink, chardev, fifo."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o644
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
